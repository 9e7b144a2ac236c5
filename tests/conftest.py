"""Shared helpers for the model tests: small configs (ours and transformers'), random weights and inputs, errors.

Everything here draws from torch's global generator, so a test that calls torch.manual_seed first is
reproducible. transformers is imported only by the helpers that need it (it is a dev dependency).

Small configs are deliberately awkward: hidden 36 with 3 heads of 12, an odd FFN width (53), an odd
feature size (29), vocabulary 101. Random weights (`randomize_`) replace the usual N(0, 0.02) with
fan-in-scaled values and LayerNorms away from (1, 0), so attention is peaked and a swapped or dropped
weight in a conversion changes the outputs.
"""

from __future__ import annotations

import os

import torch

# Triton decides between compiling and interpreting when @triton.jit runs, for its own tl.* helpers at
# `import triton`: so without a GPU the interpreter must be on before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The engine gives each run cores / local ranks threads unless OMP_NUM_THREADS is set (engine/launch.py): the
# suite's tiny models run on one (see one_thread below), and so do the processes the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import faulthandler
import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import lxmert
from kernels.errors import norm_rel_err, rel_err  # noqa: F401  (tests import them from here)

SMALL: dict[str, Any] = dict(
    vocab_size=101,
    hidden_size=36,
    num_attention_heads=3,
    intermediate_size=53,
    max_position_embeddings=40,
    type_vocab_size=2,
    l_layers=2,
    r_layers=1,
    x_layers=2,
    visual_feat_dim=29,
    num_qa_labels=13,
    num_object_labels=17,
    num_attr_labels=7,
)


def small_hf_config(**overrides: Any):
    """transformers.LxmertConfig of the SMALL sizes (visual_loss_normalizer stays transformers' 6.67)."""
    import transformers

    return transformers.LxmertConfig(**{**SMALL, **overrides})


def small_config(**overrides: Any) -> lxmert.LxmertConfig:
    """Our LxmertConfig of the SMALL sizes (visual_loss_normalizer stays ours, 1 / 0.15)."""
    return lxmert.LxmertConfig(**{**SMALL, **overrides})


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test on one intra-op thread. The models and kernels here are tiny: a second thread gains
    nothing, and on a busy 2-core machine spinning OpenMP threads make a 3 ms forward take most of a second
    (the default-size parity test: 10 s on one thread against 26 s on two, under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def console_logging():
    """The engine's console lines as the CLIs configure them (engine/logs.py: plain lines on the stdout of the
    moment), so that a test running a Trainer in-process reads them with capsys as it reads a CLI's output."""
    from engine.logs import configure_logging

    configure_logging(rank=0)


# ---------------------------------------------------------------------------------------------- errors


def assert_close(actual: torch.Tensor, reference: torch.Tensor, tol: float, what: str = "", floor: float = 0.0) -> None:
    """rel_err(actual, reference, floor) <= tol, and actual finite."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, reference, floor)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


# ----------------------------------------------------------------------------------------- weights


@torch.no_grad()
def randomize_(model: nn.Module, gain: float = 1.5) -> nn.Module:
    """Fill every parameter (ours or transformers') with random values that exercise the whole network.

    Linear / Embedding weights: N(0, gain^2 / fan_in); biases and bare parameters: N(0, 0.1^2);
    LayerNorm: weight 1 + N(0, 0.2^2), bias N(0, 0.1^2). Tied parameters are filled once.
    """
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.normal_(1.0, 0.2)
            module.bias.normal_(0.0, 0.1)
            done.update((id(module.weight), id(module.bias)))
        elif isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in done:
            module.weight.normal_(0.0, gain / math.sqrt(module.weight.shape[1]))
            done.add(id(module.weight))
    for param in model.parameters():
        if id(param) not in done:
            param.normal_(0.0, 0.1)
            done.add(id(param))
    return model


@torch.no_grad()
def perturb_(model: nn.Module, seed: int) -> nn.Module:
    """Move every parameter off its init by N(0, 0.1^2) (LayerNorm ones, zero biases), so a swapped or wrong
    copy cannot go unseen, and put the model in eval mode; parameters() yields a tied weight once, so the tie
    survives."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_to_ours(hf_model: nn.Module, our_class: type, **kwargs: Any) -> nn.Module:
    """Our model of `our_class` with the config and weights of a transformers model, in the same mode."""
    from lxmert.convert import load_into

    ours = our_class(lxmert.LxmertConfig.from_hf(hf_model.config), **kwargs)
    load_into(ours, hf_model.state_dict())
    return ours.train(hf_model.training)


# ------------------------------------------------------------------------------------------ inputs


def random_inputs(config: Any, batch: int, tokens: int, regions: int, pad: bool = True) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, token_type_ids, visual_feats, visual_pos for ours or transformers.

    `config` is either LxmertConfig. With pad=True (and tokens > 1) the last row keeps all its tokens and
    every other row is cut to a random length >= 1: padded positions get id 0 and mask 0; the first
    token of every row is real, as [CLS] is. Boxes are (x1, y1, x2, y2) in [0, 1] with x1 <= x2, y1 <= y2.
    """
    lengths = torch.full((batch,), tokens)
    if pad and tokens > 1 and batch > 1:
        lengths[:-1] = torch.randint(1, tokens, (batch - 1,))
    elif pad and tokens > 1:
        lengths[0] = torch.randint(1, tokens, ()).item()
    attention_mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(1, config.vocab_size, (batch, tokens)) * attention_mask
    token_type_ids = torch.randint(0, config.type_vocab_size, (batch, tokens))
    corners = torch.rand(batch, regions, 2, 2)  # [.., x or y, two values]
    lo, hi = corners.min(-1).values, corners.max(-1).values
    boxes = torch.cat([lo, hi], dim=-1)  # x1, y1, x2, y2
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        visual_feats=torch.randn(batch, regions, config.visual_feat_dim),
        visual_pos=boxes,
    )


def cast_floats(tree: Any, dtype: torch.dtype) -> Any:
    """The same nested dict / tuple / list with every floating-point tensor cast to dtype (ids untouched)."""
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: cast_floats(v, dtype) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(cast_floats(v, dtype) for v in tree)
    return tree


def random_pretraining_labels(config: Any, batch: int, tokens: int, regions: int) -> dict[str, Any]:
    """labels, obj_labels, matched_label and ans as transformers' LxmertForPreTraining takes them.

    MLM labels are -100 except about 30% of positions (always position (0, 0)); about 15% of regions are
    masked for feature regression (always region (0, 0)); every other pair has ans -100 (pair 0 has one).
    """
    masked = torch.rand(batch, tokens) < 0.3
    masked[0, 0] = True
    labels = torch.where(
        masked, torch.randint(0, config.vocab_size, (batch, tokens)), torch.full((batch, tokens), -100)
    )
    feat_mask = (torch.rand(batch, regions) < 0.15).float()
    feat_mask[0, 0] = 1.0
    obj_labels = {
        "obj": (torch.randint(0, config.num_object_labels, (batch, regions)), torch.rand(batch, regions)),
        "attr": (torch.randint(0, config.num_attr_labels, (batch, regions)), torch.rand(batch, regions)),
        "feat": (torch.randn(batch, regions, config.visual_feat_dim), feat_mask),
    }
    ans = torch.randint(0, config.num_qa_labels, (batch,))
    ans[1::2] = -100
    return dict(labels=labels, obj_labels=obj_labels, matched_label=torch.randint(0, 2, (batch,)), ans=ans)


# ------------------------------------------------------------------------------------------ data stores


def build_pretrain_stores(root, feat_dim: int = 16, text_splits=("mscoco_train",)):
    """A small synthetic data set (60 images) converted into a feature store and a pre-training text store:
    returns (text store dir, feature store dir). Both synthetic TSVs go into the one feature store."""
    from engine.data import convert, synthetic

    synthetic.generate(root / "syn", 60, feat_dim=feat_dim, seed=3, captions_per_image=3, questions_per_image=2)
    tsvs = [root / "syn/mscoco_imgfeat/train2014_obj36.tsv", root / "syn/mscoco_imgfeat/val2014_obj36.tsv"]
    convert.convert_features(tsvs, root / "feats", feat_dim=feat_dim, progress=False)
    texts = [root / f"syn/lxmert/{split}.json" for split in text_splits]
    convert.convert_text(texts, root / "feats", root / "text", answers=root / "syn/lxmert/all_ans.json", progress=False)
    return root / "text", root / "feats"


def tiny_model_overrides(text_store, feat_dim: int, layers: tuple[int, int, int] = (1, 1, 1)) -> list[str]:
    """model.* overrides of the tiny pre-training model the engine tests train (hidden 32, 2 heads, an odd
    intermediate size), sized for a synthetic text store's answers and the synthetic label sets."""
    from engine.data import synthetic
    from engine.data.store import TextStore

    l_layers, r_layers, x_layers = layers
    return [
        "model.hidden_size=32",
        "model.num_attention_heads=2",
        "model.intermediate_size=37",
        f"model.l_layers={l_layers}",
        f"model.r_layers={r_layers}",
        f"model.x_layers={x_layers}",
        f"model.visual_feat_dim={feat_dim}",
        f"model.num_qa_labels={len(TextStore(text_store).answers)}",
        f"model.num_object_labels={len(synthetic.OBJECT_NAMES)}",
        f"model.num_attr_labels={len(synthetic.ATTRIBUTE_NAMES)}",
        "model.attn_backend=sdpa",
    ]


# ------------------------------------------------------------------------------------- shared expensive runs


def _once_for_the_suite(tmp_path_factory, name: str, commands: list[list[str]], env: dict[str, str]) -> dict:
    """`commands`, one after the other in the repository's root, run once for the whole suite: under pytest-xdist
    the first worker to ask runs them and the others read the record (a lock in the run's common temporary
    directory). Returns {"runs": [{"argv", "proc"}], "out": the folder they write into, "seconds"}."""
    from filelock import FileLock  # torch's dependency

    base = tmp_path_factory.getbasetemp()  # under xdist, this run's root holds a folder per worker
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root, record = shared / name, shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not record.is_file():
            runs, start = [], time.perf_counter()
            for argv in commands:
                argv = [a.format(out=root / "out") for a in argv]
                proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
                runs.append({"argv": argv, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr})
            record.write_text(json.dumps({"runs": runs, "seconds": time.perf_counter() - start}))
        done = json.loads(record.read_text())
    runs = [
        {"argv": r["argv"], "proc": subprocess.CompletedProcess(r["argv"], r["returncode"], r["stdout"], r["stderr"])}
        for r in done["runs"]
    ]
    return {"runs": runs, "out": root / "out", "seconds": done["seconds"]}


def _clean_env(*drop: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="session")
def gpu_session_dry_run(tmp_path_factory) -> dict[str, Any]:
    """`python -m benchmarks.gpu_session --dry-run` as benchmarks/README.md documents it (with an output folder),
    run once for the whole suite: tests/test_gpu_session.py checks what it wrote and
    tests/test_documented_commands.py counts it as that documented command's run (it takes minutes)."""
    argv = [sys.executable, "-m", "benchmarks.gpu_session", "--dry-run", "--out", "{out}"]
    env = _clean_env("PYTHONPATH", "OMP_NUM_THREADS", "TRITON_INTERPRET")
    done = _once_for_the_suite(tmp_path_factory, "gpu_session", [argv], env)
    (run,) = done["runs"]
    return {"argv": run["argv"], "proc": run["proc"], "out": done["out"], "seconds": done["seconds"]}


@pytest.fixture(scope="session")
def throughput_smoke(tmp_path_factory) -> dict[str, Any]:
    """benchmarks/README.md's `python -m benchmarks.throughput --smoke` with a given peak (so every row has an MFU)
    and without the interpreted Triton backend, run once for the whole suite: tests/test_benchmark_throughput.py
    checks its rows and tests/test_documented_commands.py counts it as that command's run."""
    options = "--attn eager sdpa flash --peak-tflops 1 --images 12 --data-dir {out}/data"
    argv = [sys.executable, "-m", "benchmarks.throughput", "--smoke", *options.split()]
    argv += ["--out", "{out}/throughput_smoke_cpu.jsonl"]
    done = _once_for_the_suite(tmp_path_factory, "throughput_smoke", [argv], _clean_env("PYTHONPATH"))
    (run,) = done["runs"]
    return {"argv": run["argv"], "proc": run["proc"], "out": done["out"], "seconds": done["seconds"]}


REPO = Path(__file__).resolve().parents[1]
SCALING_TINY = "--model tiny --precision fp32 --micro-batch 2 --warmup 1 --steps 1 --count-steps 1 --images 12"


@pytest.fixture(scope="session")
def scaling_runs(tmp_path_factory) -> dict[str, Any]:
    """benchmarks/README.md's two CPU forms of benchmarks.scaling under the deepspeed launcher, tiny, into one
    --out: 1 rank at ZeRO 0 and 1, then 2 ranks at every stage (whose ZeRO 0 / 1 rows get a scaling efficiency
    against the first). Run once for the whole suite: tests/test_benchmark_scaling.py checks the rows and
    tests/test_documented_commands.py counts them as those documented commands' runs."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    options = [*SCALING_TINY.split(), "--data-dir", "{out}/data", "--out", "{out}/scaling.jsonl"]
    module = ["--module", "benchmarks.scaling"]
    commands = [  # a port of their own: other tests' launchers run beside them under pytest-xdist
        [launcher, "--num_gpus", "1", "--master_port", str(free_port()), *module, *options, "--stages", "0", "1"],
        [launcher, "--num_gpus", "2", "--master_port", str(free_port()), *module, *options],
    ]
    env = _clean_env("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return _once_for_the_suite(tmp_path_factory, "scaling", commands, env)


# ------------------------------------------------------------------------------ every test, on its own clock


TEST_LIMIT_S = 600  # the slowest test takes about 90 s on 2 cores; a hang costs this much CI time, not all of it
_MARK = "LXMERT_TEST_PROCESS_MARK"  # in the environment of every process a test starts (copied from os.environ)


@pytest.fixture(autouse=True)
def _on_its_own_clock_and_leaving_no_process(request):
    """Each test fails past TEST_LIMIT_S (every thread's stack is printed first) instead of hanging the suite, and
    what it started and left running is killed when it ends: a launcher killed alone, at a subprocess timeout or by
    a failed assertion, leaves its ranks orphaned, and two of them spinning starve every later test on 2 cores.
    Processes are found by a mark in their environment, so ranks that outlived their launcher are found too."""
    mark = f"{os.getpid()}:{request.node.nodeid}"
    os.environ[_MARK] = mark

    def too_long(signum, frame):
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        pytest.fail(f"over the per-test limit of {TEST_LIMIT_S} s (tests/conftest.py TEST_LIMIT_S)", pytrace=False)

    clock = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    if clock:
        previous = signal.signal(signal.SIGALRM, too_long)
        signal.alarm(TEST_LIMIT_S)
    try:
        yield
    finally:
        if clock:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        os.environ.pop(_MARK, None)
        _kill_marked(mark)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject.toml): a worker a core, at most 4. The tests' own processes run one thread each
    (OMP_NUM_THREADS=1 above); the multi-rank ones start 2 more."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def pytest_runtest_logreport(report) -> None:
    """A failure is named the moment it happens, not only in the summary at the end (a run cut off by a time
    limit never prints that summary)."""
    if report.failed:
        reporter = _CONFIG.pluginmanager.get_plugin("terminalreporter") if _CONFIG else None
        if reporter is not None:
            reporter.write_line(f"\nFAILED ({report.when}) {report.nodeid}")


_CONFIG = None


def pytest_configure(config) -> None:
    global _CONFIG
    _CONFIG = config


def _kill_marked(mark: str) -> None:
    try:
        import psutil  # DeepSpeed's dependency
    except ImportError:
        return
    me = os.getpid()
    for proc in psutil.process_iter():
        try:
            if proc.pid != me and proc.environ().get(_MARK) == mark:
                proc.kill()
        except (psutil.Error, OSError):
            pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (a launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
