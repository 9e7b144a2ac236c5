"""Every command README.md, configs/README.md and benchmarks/README.md show, run as a user types it.

The commands are read out of the documents' code blocks (a line starting with bash, python, deepspeed, torchrun,
srun, export or an lxmert- console command; backslash continuations joined, trailing comments dropped). PLAN holds each
one, in the order a user would run them, as one of:
- Run: the command as written, in one shared working directory (configs/ linked in, data/ and runs/ written
  there), with the tiny overrides that make it a test appended (a smaller model, fewer steps, outputs kept apart)
  and a few substitutions where the document's value needs hardware (`--num_gpus 8` -> 2 CPU ranks); each
  substitution must match, so a changed document fails here instead of drifting;
- Shared: run once for the whole suite by a session fixture of tests/conftest.py (the command as written, options
  appended), whose outputs other tests check too; here its exit, output and outputs are checked as a Run's;
- Elsewhere: run verbatim by something named (the README's two quick-start commands are .ci/run's);
- GpuOnly: the explicit table of what needs a GPU, with the reason;
- ClusterOnly: a line for several machines (node addresses, ssh, SLURM), with the reason; tests/test_cluster.py
  runs the same lines with every address 127.0.0.1 and one rank a node, and checks that the README shows them;
- NetworkOnly: a download from the authors' servers, with the reason (tests/test_download.py runs lxmert-download
  against a local server).
A command in a document and not in PLAN, or in PLAN and no longer in a document, fails
test_every_documented_command_is_planned. The authors' files do not exist here: the synthetic data set, written in
their layout, stands in for them (`authors_layout_stand_ins` splits its files into the ones the documents name).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "configs/README.md", "benchmarks/README.md")
HEADS = ("bash ", "python ", ".venv/bin/python ", "deepspeed ", "torchrun ", "srun ", "export ", "lxmert-")
BIN = Path(sys.executable).parent

# ------------------------------------------------------------------------------------------ reading the docs


def code_lines(text: str) -> list[list[str]]:
    """The indented (4-space) code blocks of a Markdown text, as lists of lines."""
    blocks, block, previous_blank = [], [], True
    fenced = False
    for line in [*text.splitlines(), ""]:
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("    ") and (block or previous_blank):
            block.append(line[4:])
            continue
        if block:
            blocks.append(block)
            block = []
        previous_blank = not line.strip()
    return blocks


def commands_of(block: list[str]) -> list[str]:
    joined, pending = [], ""
    for line in block:
        line = line.strip() if pending else line.rstrip()
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        joined.append(pending + line)
        pending = ""
    out = []
    for line in joined:
        line = re.sub(r"\s{2,}#.*$", "", line.strip())  # a comment after the command
        if line.startswith(HEADS):
            out.append(re.sub(r"\s+", " ", line))
    return out


def documented_commands() -> dict[str, list[str]]:
    """command -> the documents showing it."""
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        for block in code_lines((REPO / doc).read_text(encoding="utf-8")):
            for command in commands_of(block):
                found.setdefault(command, []).append(doc)
    return found


# -------------------------------------------------------------------------------------------------- the plan

# A tiny model for the base recipes (their features stay 2048-d, the synthetic data's default).
TINY_MODEL = (
    "model.hidden_size=32 model.num_attention_heads=2 model.intermediate_size=37 model.l_layers=1 "
    "model.r_layers=1 model.x_layers=1"
)
# the stand-ins hold the synthetic set's 54 answers and its four sources (the authors' all_ans.json has 9500)
SHORT_PRETRAIN = (
    "model.num_qa_labels=54 data.num_workers=0 data.sources=[mscoco,vg,vqa,gqa] train.batch_size=8 "
    "train.max_steps=3 train.log_every=1"
)
SHORT_FINETUNE = "data.num_workers=0 train.batch_size=8 train.max_steps=3 train.log_every=1"


@dataclass(frozen=True)
class Run:
    append: str = ""
    replace: tuple[tuple[str, str], ...] = ()
    check: Callable[[Path], None] | None = None
    in_checkout: bool = False
    """Run in the repository's root, as `python -m benchmarks.*` must be (benchmarks/ is not an installed
    package); "{work}" in `append` is the shared directory."""
    timeout: int = 600


@dataclass(frozen=True)
class Shared:
    fixture: str
    check: Callable[[Path], None] | None = None
    """Called with the run's output folder."""
    replace: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Elsewhere:
    where: str


@dataclass(frozen=True)
class GpuOnly:
    reason: str


@dataclass(frozen=True)
class ClusterOnly:
    reason: str


@dataclass(frozen=True)
class NetworkOnly:
    reason: str


def records(path: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r.get("kind", "train") == kind]


def trained(run: str, steps: int = 3, every: int = 1) -> Callable[[Path], None]:
    """The run logged every `every`-th of `steps` steps with finite losses and gradient norms, and exported
    its model."""

    def check(work: Path) -> None:
        train = records(work / run / "metrics.jsonl")
        assert [r["step"] for r in train] == list(range(every, steps + 1, every)), train
        for r in train:
            assert all(isinstance(v, float) and v == v for v in (r["loss"], r["grad_norm"])), r
        assert (work / run / "model.safetensors").is_file() and (work / run / "model_config.json").is_file()

    return check


def fine_tuned(run: str) -> Callable[[Path], None]:
    def check(work: Path) -> None:
        train = records(work / run / "metrics.jsonl")
        assert len(train) == 3 and all(r["grad_norm"] == r["grad_norm"] for r in train)
        (evaluation,) = records(work / run / "metrics.jsonl", "eval")
        assert 0 <= evaluation["metric"] <= 1
        assert (work / run / "best/model.safetensors").is_file() and (work / run / "vqa_submission.json").is_file()
        # the architecture came from the pre-training export, not from the recipe's defaults
        model = json.loads((work / run / "best/model_config.json").read_text())
        assert (model["hidden_size"], model["num_attention_heads"], model["l_layers"]) == (32, 2, 1)

    return check


def stores(*names: str) -> Callable[[Path], None]:
    def check(work: Path) -> None:
        for name in names:
            assert (work / name / "meta.json").is_file(), name

    return check


def converted_from_the_authors(work: Path) -> None:
    from lxmert.convert import read_state_dict

    ours, back = read_state_dict(work / "runs/pretrain/model.safetensors"), read_state_dict(work / "out.safetensors")
    assert sorted(ours) == sorted(back) and all(torch.equal(ours[k], back[k]) for k in ours)


def loads_in_transformers(work: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model, info = transformers.LxmertForPreTraining.from_pretrained(work / "runs/pretrain_hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.num_attention_heads == 2  # the export's, where hidden / 64 would not even be an integer


def evaluated(work: Path) -> None:
    result = json.loads((work / "runs/vqa/evaluate/result.json").read_text())
    assert 0 <= result["value"] <= 1 and Path(work / result["submission"]).is_file()


def predicted_as_evaluated(work: Path) -> None:
    """lxmert-predict's submission for the minival store is the one --evaluate-only wrote for the same model."""
    ours = (work / "runs/vqa_predictions.json").read_bytes()
    assert ours == (work / "runs/vqa/evaluate/vqa_submission.json").read_bytes()


def pictures(prefix: str) -> Callable[[Path], None]:
    def check(work: Path) -> None:
        svg = (work / f"{prefix}.svg").read_text()  # the maps' gids, written by matplotlib as ids
        assert all(f'id="{gid}"' in svg for gid in ("language", "regions", "cross:0"))
        assert (work / f"{prefix}.png").read_bytes().startswith(b"\x89PNG")

    return check


def model_dir(run: str) -> Callable[[Path], None]:
    def check(work: Path) -> None:
        assert (work / run / "model.safetensors").is_file() and (work / run / "model_config.json").is_file()

    return check


def evaluated_into(run: str) -> Callable[[Path], None]:
    def check(work: Path) -> None:
        result = json.loads((work / run / "evaluate/result.json").read_text())
        assert 0 <= result["value"] <= 1 and Path(work / result["submission"]).is_file()

    return check


def benchmark_rows(name: str) -> Callable[[Path], None]:
    def check(work: Path) -> None:
        rows = [json.loads(line) for line in (work / "bench" / f"{name}.jsonl").read_text().splitlines()]
        assert rows and all(r["device"] == "cpu" for r in rows)

    return check


def throughput_rows(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "throughput_smoke_cpu.jsonl").read_text().splitlines()]
    assert any(r.get("samples_per_s") for r in rows) and all(r["device"] == "cpu" for r in rows)


def scaling_rows(world: int) -> Callable[[Path], None]:
    def check(out: Path) -> None:
        rows = [json.loads(line) for line in (out / "scaling.jsonl").read_text().splitlines()]
        assert any(r["world_size"] == world for r in rows) and all(r["device"] == "cpu" for r in rows)

    return check


def dry_run_summary(out: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["session"]["dry_run"] and all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    assert summary["numbers"] and all(n["measured_on"] == "cpu" and n["dry_run"] for n in summary["numbers"])


def out(name: str) -> str:
    return f"--out {{work}}/bench/{name}.jsonl"  # the benchmarks run in the checkout: keep its runs/ untouched


PLAN: list[tuple[str, Run | Shared | Elsewhere | GpuOnly | ClusterOnly | NetworkOnly]] = [
    ("bash scripts/setup.sh && .venv/bin/python -m engine.main", Elsewhere(".ci/run")),
    ("bash scripts/setup.sh --dev && .venv/bin/python -m pytest -q", Elsewhere(".ci/run")),
    # README, Data
    ("python -m engine.data.synthetic data/ --images 500 --seed 0", Run()),
    ("python -m engine.data.convert --tsv data/mscoco_imgfeat/*.tsv --out data/feats", Run(check=stores("data/feats"))),
    (
        "python -m engine.data.convert --text data/lxmert/mscoco_train.json --features data/feats --answers "
        "data/lxmert/all_ans.json --out data/text_train",
        Run(check=stores("data/text_train")),
    ),
    # configs/README, the stores of the recipes (from the stand-ins of the authors' files)
    (
        "lxmert-data-convert --tsv data/mscoco_imgfeat/train2014_obj36.tsv data/mscoco_imgfeat/val2014_obj36.tsv "
        "data/vg_gqa_imgfeat/vg_gqa_obj36.tsv --out data/stores/feats",
        Run(check=stores("data/stores/feats")),
    ),
    (
        "lxmert-data-convert --text data/lxmert/mscoco_train.json data/lxmert/mscoco_nominival.json "
        "data/lxmert/vgnococo.json --features data/stores/feats --answers data/lxmert/all_ans.json --out "
        "data/stores/text_train",
        Run(check=stores("data/stores/text_train")),
    ),
    (
        "lxmert-data-convert --text data/lxmert/mscoco_minival.json --features data/stores/feats --answers "
        "data/lxmert/all_ans.json --out data/stores/text_minival",
        Run(),
    ),
    (
        "lxmert-data-convert --task vqa --questions data/vqa/train.json data/vqa/nominival.json --features "
        "data/stores/feats --ans2label data/vqa/trainval_ans2label.json --out data/stores/vqa_train",
        Run(),
    ),
    (
        "lxmert-data-convert --task vqa --questions data/vqa/minival.json --features data/stores/feats --ans2label "
        "data/vqa/trainval_ans2label.json --out data/stores/vqa_minival",
        Run(),
    ),
    (
        "lxmert-data-convert --task gqa --questions data/gqa/train.json data/gqa/valid.json --features "
        "data/stores/feats --ans2label data/gqa/trainval_ans2label.json --out data/stores/gqa_train",
        Run(),
    ),
    ("lxmert-data-convert --tsv data/vg_gqa_imgfeat/gqa_testdev_obj36.tsv --out data/stores/feats_gqa_testdev", Run()),
    (
        "lxmert-data-convert --task gqa --questions data/gqa/testdev.json --features data/stores/feats_gqa_testdev "
        "--ans2label data/gqa/trainval_ans2label.json --out data/stores/gqa_testdev",
        Run(),
    ),
    (
        "lxmert-data-convert --tsv data/nlvr2_imgfeat/train_obj36.tsv data/nlvr2_imgfeat/valid_obj36.tsv --out "
        "data/stores/feats_nlvr2",
        Run(),
    ),
    (
        "lxmert-data-convert --task nlvr2 --questions data/nlvr2/train.json --features data/stores/feats_nlvr2 --out "
        "data/stores/nlvr2_train",
        Run(),
    ),
    (
        "lxmert-data-convert --task nlvr2 --questions data/nlvr2/valid.json --features data/stores/feats_nlvr2 --out "
        "data/stores/nlvr2_valid",
        Run(
            check=stores(
                *(
                    f"data/stores/{n}"
                    for n in (
                        "vqa_train",
                        "vqa_minival",
                        "gqa_train",
                        "feats_gqa_testdev",
                        "gqa_testdev",
                        "feats_nlvr2",
                        "nlvr2_train",
                        "nlvr2_valid",
                    )
                )
            )
        ),
    ),
    # README and configs/README, training: the recipe chain pretrain.yaml -> vqa.yaml
    (
        "lxmert-pretrain --config configs/pretrain.yaml",
        Run(f"{TINY_MODEL} {SHORT_PRETRAIN}", check=trained("runs/pretrain")),
    ),
    (
        "deepspeed --num_gpus 8 --module engine.pretrain --config configs/pretrain.yaml train.zero_stage=2 "
        "deepspeed.config=configs/deepspeed/zero2.json",
        Run(
            f"{TINY_MODEL} {SHORT_PRETRAIN} train.output_dir=runs/pretrain_zero2",
            (("--num_gpus 8", "--num_gpus 2"),),
            check=trained("runs/pretrain_zero2"),
        ),
    ),
    (
        "torchrun --nproc_per_node 8 -m engine.pretrain --config configs/pretrain_adamw.yaml train.precision=bf16",
        Run(
            f"{TINY_MODEL} {SHORT_PRETRAIN}",
            (("--nproc_per_node 8", "--nproc_per_node 2"),),
            check=trained("runs/pretrain_adamw"),
        ),
    ),
    ("lxmert-convert runs/pretrain/model.safetensors runs/pretrain_hf --to hf", Run(check=loads_in_transformers)),
    ("lxmert-convert model_LXRT.pth out.safetensors --from authors", Run(check=converted_from_the_authors)),
    ("lxmert-finetune --config configs/vqa.yaml", Run(SHORT_FINETUNE, check=fine_tuned("runs/vqa"))),
    (
        "deepspeed --num_gpus 4 --module engine.finetune --config configs/vqa.yaml",
        Run(
            f"{SHORT_FINETUNE} train.output_dir=runs/vqa_zero",
            (("--num_gpus 4", "--num_gpus 2"),),
            check=fine_tuned("runs/vqa_zero"),
        ),
    ),
    (
        "lxmert-finetune --config configs/vqa.yaml --evaluate-only train.init_from=runs/vqa/best",
        Run("data.num_workers=0", check=evaluated),
    ),
    # README, From the paper's data: the download lines; the authors' weights (a stand-in cut from the pre-training
    # export, see BEFORE) converted, fine-tuned on VQA and evaluated
    ("lxmert-download --list", Run()),
    (
        "lxmert-download vqa vg-features model",
        NetworkOnly(
            "tens of GB from the authors' servers; tests/test_download.py fetches every group from a local one"
        ),
    ),
    (
        "lxmert-convert snap/pretrained/model_LXRT.pth runs/lxmert_authors --from authors --num-attention-heads 12",
        Run(replace=(("--num-attention-heads 12", "--num-attention-heads 2"),), check=model_dir("runs/lxmert_authors")),
    ),
    (
        "lxmert-finetune --config configs/vqa.yaml --answer-table data/lxmert/all_ans.json "
        "train.init_from=runs/lxmert_authors train.output_dir=runs/vqa_authors",
        Run(SHORT_FINETUNE, check=fine_tuned("runs/vqa_authors")),
    ),
    (
        "lxmert-finetune --config configs/vqa.yaml --evaluate-only train.init_from=runs/vqa_authors/best "
        "train.output_dir=runs/vqa_authors",
        Run("data.num_workers=0", check=evaluated_into("runs/vqa_authors")),
    ),
    # README, the attention pictures (the main job's outputs there; the recipe chain's here)
    (
        "lxmert-attention runs/main/pretrain --text-store runs/main/stores/text_minival --index 18 --object-names "
        "runs/main/data/synthetic.json --out runs/main/attention",
        Run(
            replace=(
                ("runs/main/pretrain", "runs/pretrain"),
                ("runs/main/stores/text_minival", "data/stores/text_minival"),
                ("runs/main/data/synthetic.json", "data/synthetic.json"),
                ("runs/main/attention", "runs/attention"),
            ),
            check=pictures("runs/attention"),
        ),
    ),
    (
        'lxmert-attention runs/main/vqa/best --sentence "what color is the bear in the room?" --tsv '
        "runs/main/data/mscoco_imgfeat/val2014_obj36.tsv --img-id COCO_val2014_000000000001 --head 2 --out "
        "runs/main/vqa_attention",
        Run(
            replace=(
                ("runs/main/vqa/best", "runs/vqa/best"),
                ("runs/main/data/", "data/"),
                ("runs/main/vqa_attention", "runs/vqa_attention"),
                ("--head 2", "--head 1"),
            ),  # the tiny model's 2 heads
            check=pictures("runs/vqa_attention"),
        ),
    ),
    # README, asking the model (the main job's outputs there; the recipe chain's here)
    (
        "lxmert-predict --model runs/main/vqa/best --features runs/main/data/mscoco_imgfeat/val2014_obj36.tsv "
        '--image COCO_val2014_000000000001 --question "what color are the chairs in the room?" --question '
        '"how many bears are there in the room?"',
        Run(replace=(("runs/main/vqa/best", "runs/vqa/best"), ("runs/main/data/", "data/"))),
    ),
    (
        "lxmert-predict --model runs/main/vqa/best --task-store runs/main/stores/vqa_minival --out "
        "runs/main/vqa_predictions.json",
        Run(
            replace=(
                ("runs/main/vqa/best", "runs/vqa/best"),
                ("runs/main/stores/vqa_minival", "data/stores/vqa_minival"),
                ("runs/main/vqa_predictions.json", "runs/vqa_predictions.json"),
            ),
            check=predicted_as_evaluated,
        ),
    ),
    # configs/README, the tiny recipe
    ("lxmert-synthetic data/synthetic --images 400 --feat-dim 64 --seed 0", Run()),
    (
        "lxmert-data-convert --feat-dim 64 --tsv data/synthetic/mscoco_imgfeat/train2014_obj36.tsv "
        "data/synthetic/mscoco_imgfeat/val2014_obj36.tsv --out data/synthetic/stores/feats",
        Run(),
    ),
    (
        "lxmert-data-convert --text data/synthetic/lxmert/mscoco_train.json --features data/synthetic/stores/feats "
        "--answers data/synthetic/lxmert/all_ans.json --out data/synthetic/stores/text_train",
        Run(),
    ),
    (
        "lxmert-data-convert --text data/synthetic/lxmert/mscoco_minival.json --features data/synthetic/stores/feats "
        "--answers data/synthetic/lxmert/all_ans.json --out data/synthetic/stores/text_minival",
        Run(),
    ),
    (
        "lxmert-pretrain --config configs/tiny_cpu.yaml",
        Run("train.max_steps=20", check=trained("runs/tiny_cpu", 20, every=10)),
    ),
    # README and benchmarks/README, the benchmarks' CPU forms
    ("python -m benchmarks.projection", Run(in_checkout=True)),
    (
        "python -m benchmarks.projection [--step-time-ms T] [--micro-batch 64] [--nvlink-gbs 360] [--ib-gbs 45] "
        "[--overlap 0 0.5] [--deepspeed-default]",
        Run(
            replace=(
                (
                    "[--step-time-ms T] [--micro-batch 64] [--nvlink-gbs 360] [--ib-gbs 45] [--overlap 0 0.5] "
                    "[--deepspeed-default]",
                    "--step-time-ms 9.5 --micro-batch 64 --nvlink-gbs 360 --ib-gbs 45 "
                    "--overlap 0 0.5 --deepspeed-default",
                ),
            ),
            in_checkout=True,
        ),
    ),
    ("python -m benchmarks.kernels", Run(out("kernels"), in_checkout=True)),  # without a GPU: the checks, no timing
    (
        "python -m benchmarks.kernels [--quick] [--check-only]",
        Run(out("kernels"), (("[--quick] [--check-only]", "--quick --check-only"),), in_checkout=True),
    ),
    ("python -m benchmarks.dataloader", Run(f"--quick {out('dataloader')}", in_checkout=True)),
    (
        "python -m benchmarks.dataloader [--quick] [--batch-size 64] [--step-ms T]",
        Run(
            out("dataloader"),
            (("[--quick] [--batch-size 64] [--step-ms T]", "--quick --batch-size 64 --step-ms 1"),),
            check=benchmark_rows("dataloader"),
            in_checkout=True,
        ),
    ),
    (
        "python -m benchmarks.kernels_sm90 [--jobs N] [--only TEXT] [--out runs/benchmarks/kernels_sm90.md]",
        Run(
            replace=(
                (
                    "[--jobs N] [--only TEXT] [--out runs/benchmarks/kernels_sm90.md]",
                    "--jobs 2 --only featreg --out {work}/bench/kernels_sm90.md",
                ),
            ),
            in_checkout=True,
        ),
    ),
    (
        "python -m benchmarks.host_waits [--paths eager sdpa triton flash zero1 zero2] "
        "[--out runs/benchmarks/host_waits.md]",
        Run(
            replace=(
                (
                    "[--paths eager sdpa triton flash zero1 zero2] [--out runs/benchmarks/host_waits.md]",
                    "--paths eager flash zero1 --steps 4 --log-every 2 --out {work}/bench/host_waits.md",
                ),
            ),
            in_checkout=True,
        ),
    ),
    (
        "python -m benchmarks.store_precision [--steps 300]",
        Run(
            replace=(("[--steps 300]", "--steps 4 --log-every 2 --images 24 --out {work}/bench/store_precision.md"),),
            in_checkout=True,
        ),
    ),
    ("python -m benchmarks.throughput --smoke", Shared("throughput_smoke", check=throughput_rows)),
    ("python -m benchmarks.gpu_session --dry-run", Shared("gpu_session_dry_run", check=dry_run_summary)),
    ("deepspeed --num_gpus 1 --module benchmarks.scaling", Shared("scaling_runs", check=scaling_rows(1))),
    (
        "deepspeed --num_gpus 2 --module benchmarks.scaling --model base --precision fp32 --micro-batch 2 --warmup 1 "
        "--steps 1 --count-steps 1 --images 12",
        Shared("scaling_runs", check=scaling_rows(2), replace=(("--model base", "--model tiny"),)),
    ),
    # README, Many machines: node addresses and several machines; tests/test_cluster.py runs these lines on
    # 127.0.0.1, two invocations of one rank each
    (
        "deepspeed --hostfile hostfile --master_addr node0 --module engine.pretrain --config configs/pretrain.yaml "
        "train.zero_stage=2",
        ClusterOnly(
            "starts the other nodes over ssh with pdsh (neither is here); the --no_ssh "
            "form below runs in tests/test_cluster.py"
        ),
    ),
    (
        "deepspeed --hostfile hostfile --no_ssh --node_rank $NODE_RANK --master_addr node0 --master_port 29500 --module "  # noqa: E501
        "engine.pretrain --config configs/pretrain.yaml train.zero_stage=2",
        ClusterOnly("one line per node, node0 a machine's address: tests/test_cluster.py (127.0.0.1, 2 nodes)"),
    ),
    (
        "torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK --master_addr node0 --master_port 29500 -m "
        "engine.pretrain --config configs/pretrain.yaml train.zero_stage=2",
        ClusterOnly("one line per node, node0 a machine's address: tests/test_cluster.py (127.0.0.1, 2 nodes)"),
    ),
    (
        "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500 --rdzv_id lxmert -m "
        "engine.pretrain --config configs/pretrain.yaml train.zero_stage=2",
        ClusterOnly("one line per node, node0 a machine's address: tests/test_cluster.py (127.0.0.1, 2 nodes)"),
    ),
    (
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        ClusterOnly("a SLURM job's node list; tests/test_cluster.py gives its tasks MASTER_ADDR=127.0.0.1"),
    ),
    (
        "srun --nodes 2 --ntasks-per-node 8 python -m engine.pretrain --config configs/pretrain.yaml train.zero_stage=2",  # noqa: E501
        ClusterOnly("needs SLURM; tests/test_cluster.py starts two tasks with the SLURM_* variables srun sets"),
    ),
    # GPU-only
    (
        "python -m benchmarks.throughput",
        GpuOnly(
            "the sweep times CUDA kernels; without a GPU it refuses "
            "(tests/test_benchmark_throughput.py); --smoke is its CPU check"
        ),
    ),
    ("deepspeed --num_gpus N --module benchmarks.scaling", GpuOnly("N GPUs; its 1- and 2-rank CPU forms run above")),
    ("deepspeed --num_gpus 8 --module benchmarks.scaling", GpuOnly("eight GPUs")),
    (
        "python -m benchmarks.gpu_session --out DIR [--wheels DIR] [--budget SECONDS]",
        GpuOnly(
            "without a GPU it stops after the environment stage (tests/test_gpu_session.py); --dry-run is its CPU form"
        ),
    ),
]
RUNS = [(command, plan) for command, plan in PLAN if isinstance(plan, Run)]
SHARED = [(command, plan) for command, plan in PLAN if isinstance(plan, Shared)]


def test_every_documented_command_is_planned():
    documented = documented_commands()
    planned = [command for command, _ in PLAN]
    assert len(planned) == len(set(planned)), "a command planned twice"
    missing = [c for c in documented if c not in planned]
    stale = [c for c in planned if c not in documented]
    assert not missing, f"documented but not in PLAN (run it here, or say why it needs a GPU): {missing}"
    assert not stale, f"in PLAN but no longer documented: {stale}"


def test_ci_runs_the_readme_commands_verbatim():
    ci = (REPO / ".ci/run").read_text()
    lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith(("#", "echo"))]
    for command, plan in PLAN:
        if isinstance(plan, Elsewhere) and plan.where == ".ci/run":
            assert command in lines, command
    quick_start = [c for c, p in PLAN if isinstance(p, Elsewhere)]
    assert lines.index(quick_start[0]) < lines.index(quick_start[1]), "the main job runs before the tests"


def test_the_readme_python_example_runs():
    """The README's "Using the model" block, executed as written."""
    text = (REPO / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, re.S)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    out = namespace["out"]
    assert torch.isfinite(out.loss) and set(out.losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    assert out.prediction_logits is None or out.prediction_logits.shape[-1] == namespace["config"].vocab_size


# ------------------------------------------------------------------------------------------------ running them


def authors_layout_stand_ins(data: Path) -> None:
    """The files configs/README.md names, cut from the synthetic set (written in the authors' layout): the
    train2014 TSV gives its last third to vg_gqa_obj36.tsv; the pre-training, VQA and GQA train JSON are split
    into the authors' train / nominival / vgnococo and train / valid parts; the GQA testdev and NLVR2 images get
    TSVs of their own (copies of the synthetic ones: each goes into a store of its own)."""
    tsv = data / "mscoco_imgfeat/train2014_obj36.tsv"
    rows = tsv.read_text().splitlines(keepends=True)
    (data / "nlvr2_imgfeat").mkdir()
    shutil.copy(tsv, data / "nlvr2_imgfeat/train_obj36.tsv")
    shutil.copy(data / "mscoco_imgfeat/val2014_obj36.tsv", data / "nlvr2_imgfeat/valid_obj36.tsv")
    (data / "vg_gqa_imgfeat").mkdir()
    cut = 2 * len(rows) // 3
    tsv.write_text("".join(rows[:cut]))
    (data / "vg_gqa_imgfeat/vg_gqa_obj36.tsv").write_text("".join(rows[cut:]))
    shutil.copy(data / "mscoco_imgfeat/val2014_obj36.tsv", data / "vg_gqa_imgfeat/gqa_testdev_obj36.tsv")

    def split(path: Path, names: list[str]) -> None:
        items = json.loads(path.read_text())
        size = -(-len(items) // len(names))
        for i, name in enumerate(names):
            (path.parent / name).write_text(json.dumps(items[i * size : (i + 1) * size]))

    split(data / "lxmert/mscoco_train.json", ["mscoco_train.json", "mscoco_nominival.json", "vgnococo.json"])
    split(data / "vqa/train.json", ["train.json", "nominival.json"])
    split(data / "gqa/train.json", ["train.json", "valid.json"])


def authors_checkpoint(work: Path, path: str = "model_LXRT.pth") -> None:
    """model_LXRT.pth as airsplay/lxmert saves it (DataParallel `module.bert.` names), from the pre-training
    export, so that the conversion back can be checked key by key."""
    from lxmert.convert import read_state_dict, to_hf_state_dict

    hf = to_hf_state_dict(read_state_dict(work / "runs/pretrain/model.safetensors"))
    (work / path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module." + re.sub(r"^lxmert\.", "bert.", k): v for k, v in hf.items()}, work / path)


# what must be in place before a command runs, beyond the commands before it
BEFORE = {
    "lxmert-data-convert --tsv data/mscoco_imgfeat/train2014_obj36.tsv": lambda work: authors_layout_stand_ins(
        work / "data"
    ),
    "lxmert-convert model_LXRT.pth": authors_checkpoint,
    # where lxmert-download puts it
    "lxmert-convert snap/pretrained/model_LXRT.pth": lambda work: authors_checkpoint(
        work, "snap/pretrained/model_LXRT.pth"
    ),
}


def the_command(command: str, plan: Run, work: Path) -> str:
    for old, new in plan.replace:
        assert old in command, f"{old!r} is no longer in {command!r}: update PLAN"
        command = command.replace(old, new)
    return f"{command} {plan.append}".strip().format(work=work)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("user")
    (work / "configs").symlink_to(REPO / "configs")
    return work


_failed: list[str] = []


@pytest.mark.slow
@pytest.mark.parametrize("command, plan", RUNS, ids=[c[:80] for c, _ in RUNS])
def test_documented_command_runs(command, plan, workdir):
    if _failed:
        pytest.skip(f"an earlier command failed: {_failed[0]}")
    for prefix, prepare in BEFORE.items():
        if command.startswith(prefix):
            prepare(workdir)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH")
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the venv's python and console commands, as activated
    (workdir / "bench").mkdir(exist_ok=True)
    line = the_command(command, plan, workdir)
    proc = subprocess.run(
        ["bash", "-c", line],
        cwd=REPO if plan.in_checkout else workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=plan.timeout,
    )
    # DeepSpeed 0.19.8 on the CPU: about 2 in 75 launches a rank aborts at exit ("terminate called without an
    # active exception") after writing everything; the check below then decides
    aborted_at_exit = "terminate called without an active exception" in proc.stderr and plan.check is not None
    try:
        assert_ran_clean(line, proc, aborted_at_exit)
        if plan.check is not None:
            plan.check(workdir)
    except BaseException:
        _failed.append(command)
        raise


def assert_ran_clean(line: str, proc: subprocess.CompletedProcess, aborted_at_exit: bool = False) -> None:
    """Exit 0 (or DeepSpeed's abort at exit, when a check reads the results), no traceback, none of the known noise."""
    assert proc.returncode == 0 or aborted_at_exit, (
        f"{line}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    if not line.startswith(("deepspeed ", "torchrun ")):  # a launcher's own process is DeepSpeed's, not ours
        for noise in ("Setting accelerator to CPU", "untested optimizer"):
            assert noise not in proc.stdout + proc.stderr, noise


@pytest.mark.slow
@pytest.mark.parametrize("command, plan", SHARED, ids=[c[:80] for c, _ in SHARED])
def test_documented_command_shared_run(command, plan, request):
    """The suite's one run of the command (a conftest fixture), checked as test_documented_command_runs would. The
    fixture may add a launcher's --master_port (other tests' launchers run beside it)."""
    result = request.getfixturevalue(plan.fixture)
    for old, new in plan.replace:
        assert old in command, f"{old!r} is no longer in {command!r}: update PLAN"
        command = command.replace(old, new)
    runs = result["runs"] if "runs" in result else [result]
    lines = {}
    for run in runs:
        argv = ["python" if run["argv"][0] == sys.executable else Path(run["argv"][0]).name, *run["argv"][1:]]
        lines[re.sub(r" --master_port \d+", "", " ".join(argv))] = run["proc"]
    line = next((x for x in lines if x.startswith(command + " ") or x == command), None)
    assert line is not None, f"the fixture runs {list(lines)}, not {command!r}"
    # DeepSpeed's occasional abort at exit (test_documented_command_runs): the check then decides
    assert_ran_clean(line, lines[line], "terminate called without" in lines[line].stderr and plan.check is not None)
    if plan.check is not None:
        plan.check(result["out"])
