"""Golden runs: a fixed-seed tiny pre-training run and the fine-tuning runs started from it (VQA, NLVR2) must log
the losses, evaluations and final weights recorded in tests/golden/runs.json, bit for bit.

They guard refactors of the training side that are not meant to change numerics (issue 12: one loop, one data
path). Everything that decides numbers is on: dropout, gradient accumulation, BertAdam's and AdamW's steps,
evaluation, the export, initialising the fine-tuning heads from the pre-trained QA head.

Bit-identity holds for the machine kind the values were recorded on (torch version, CPU capability and CPU model:
other SIMD paths, and the same AVX512 path on another vendor's CPU, round differently); elsewhere the numbers are
compared to 1e-5 and the weights' hashes are not.
    python tests/test_golden_runs.py --record      # rewrites tests/golden/runs.json (only for a numerics change)
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's helpers when run as a script

from conftest import build_pretrain_stores, tiny_model_overrides  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "runs.json"
D = 16


def cpu_model() -> str:
    """The CPU's model name as Linux reports it ("" where /proc/cpuinfo does not say)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def fingerprint() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model()}


def weights_sha256(path: Path) -> str:
    from lxmert.convert import read_state_dict

    state = read_state_dict(path)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def logged(metrics: Path) -> list[dict]:
    """What the run logged that is numerics: each record's kind, step, losses and metric (not timings)."""
    keep = ("kind", "step", "loss", "losses", "grad_norm", "lr", "metric", "qa_accuracy", "matched_accuracy")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [{k: r[k] for k in keep if k in r} for r in rows if r.get("kind", "train") in ("train", "eval")]


def run_all(root: Path) -> dict:
    """Build the data, run the three runs; return what each logged and the hashes of its final weights."""
    from engine.config import load_config
    from engine.data import convert
    from engine.data.tasks import convert_task
    from engine.finetune import FineTuner
    from engine.tasks.pretrain import PretrainTask
    from engine.train import Trainer

    torch.set_num_threads(1)
    text, feats = build_pretrain_stores(root / "data", D)
    syn = root / "data/syn"
    convert.convert_text(
        [syn / "lxmert/mscoco_minival.json"],
        feats,
        root / "data/minival",
        answers=syn / "lxmert/all_ans.json",
        progress=False,
    )
    for task, split in (("vqa", "train"), ("vqa", "minival"), ("nlvr2", "train"), ("nlvr2", "valid")):
        a2l = syn / task / "trainval_ans2label.json" if task != "nlvr2" else None
        convert_task(task, [syn / task / f"{split}.json"], feats, a2l, root / f"data/{task}_{split}")
    common = ["train.threads=1", "train.seed=3", "data.seed=4", "data.num_workers=0"]
    pre = root / "pretrain"
    Trainer(
        load_config(
            None,
            [
                *tiny_model_overrides(text, D, layers=(2, 1, 2)),
                *common,
                f"data.train.text={text}",
                f"data.train.features={feats}",
                f"data.eval.text={root / 'data/minival'}",
                f"data.eval.features={feats}",
                "optim.name=bertadam",
                "optim.lr=1e-3",
                "train.batch_size=8",
                "train.micro_batch_size=4",
                "train.epochs=100",
                "train.max_steps=6",
                "train.log_every=1",
                "train.eval_every=3",
                "train.save_every=3",
                f"train.output_dir={pre}",
            ],
        ),
        PretrainTask(),
        use_deepspeed=False,
    ).train()
    out = {"pretrain": {"logged": logged(pre / "metrics.jsonl"), "weights": weights_sha256(pre / "model.safetensors")}}
    for task, eval_split in (("vqa", "minival"), ("nlvr2", "valid")):
        run = root / task
        FineTuner(
            load_config(
                None,
                [
                    *common,
                    f"train.task={task}",
                    f"data.train.text={root / f'data/{task}_train'}",
                    f"data.train.features={feats}",
                    f"data.eval.text={root / f'data/{task}_{eval_split}'}",
                    f"data.eval.features={feats}",
                    f"train.init_from={pre / 'model.safetensors'}",
                    "optim.name=adamw",
                    "optim.lr=5e-4",
                    "train.batch_size=8",
                    "train.grad_accum_steps=2",
                    "train.epochs=2",
                    "train.log_every=2",
                    f"train.output_dir={run}",
                ],
            ),
            answer_table=str(text),
        ).train()
        out[task] = {"logged": logged(run / "metrics.jsonl"), "weights": weights_sha256(run / "best/model.safetensors")}
    return out


def close(a, b, rel: float) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or math.isclose(a, b, rel_tol=rel, abs_tol=rel)
    return a == b


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_the_golden_runs_are_reproduced(golden, tmp_path):
    got = run_all(tmp_path)
    same_machine = golden["fingerprint"] == fingerprint()
    for run in ("pretrain", "vqa", "nlvr2"):
        expected = golden["runs"][run]
        assert len(got[run]["logged"]) == len(expected["logged"]) > 0, run
        for g, e in zip(got[run]["logged"], expected["logged"]):
            if same_machine:
                assert g == e, (run, g, e)  # bit for bit
            else:
                assert close(g, e, 1e-5), (run, g, e)
        if same_machine:
            assert got[run]["weights"] == expected["weights"], run


if __name__ == "__main__" and "--record" in sys.argv:
    import os
    import tempfile

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_all(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"fingerprint": fingerprint(), "runs": runs}, indent=1) + "\n")
    print(f"recorded {GOLDEN}: " + ", ".join(f"{k} {len(v['logged'])} records" for k, v in runs.items()))
