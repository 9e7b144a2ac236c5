"""The training step never makes the host wait for the device between log lines (issue 13): counted on the CPU
by benchmarks/host_waits.py's TorchDispatchMode over a 20-step tiny pre-training run logging every 10 steps, for
the plain path with eager, sdpa, Triton and flash attention (flash in bf16 on the project's stand-in for flash-attn,
with the unpadding the loader finds on the host); DeepSpeed's own waits (bf16 ZeRO-1: 1 a step) match what
the committed report says. The training forward and losses trace into one graph (torch._dynamo.explain: no
graph break)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.host_waits import HostWaitCounter, count_run, summarise, tiny_config

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "host_waits.md"
LOG_EVERY = 10
MAX_ON_A_LOG_STEP = 12


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("host_waits")


def test_the_counter_sees_every_kind_of_wait():
    x = torch.randn(6)
    mask = x > 0
    counter = HostWaitCounter()
    with counter:
        counter.phase = "measured"
        x.sum().item()
        bool(x.sum() > 0)
        float(x.max())
        x.nonzero()
        x.masked_select(mask)
        x[mask]
        torch.unique(x)
        x.tolist()
        x.numpy()
        x.cpu()
        torch.randint(0, 10, (1,), device="cpu").item()  # made on the host on purpose: not a device read
        x * 2 + 1  # no read
        with counter.paused():
            x.sum().item()
    assert counter.counts["measured"] == {
        "item": 3,
        "nonzero": 1,
        "masked_select": 1,
        "bool_index": 1,
        "unique": 1,
        "tolist": 1,
        "numpy": 1,
        "cpu": 1,
    }


def test_the_losses_find_masked_rows_with_a_wait_only_when_not_handed_them(work):
    from engine.tasks.pretrain import PretrainTask
    from engine.train import Trainer

    trainer = Trainer(tiny_config("sdpa", work, 1, 1), PretrainTask(), use_deepspeed=False)
    batch = next(iter(trainer.loader))
    inputs = batch.model_inputs()
    counts = {}
    for given in (True, False):
        if not given:
            inputs = {k: v for k, v in inputs.items() if k not in ("mlm_rows", "feat_rows")}
        counter = HostWaitCounter()
        with counter:
            counter.phase = given
            out = trainer.model(**inputs)
            out.loss.backward()
        counts[given] = counter.counts.get(given, {})
        torch.manual_seed(0)
    assert counts[True] == {} and counts[False] == {"nonzero": 2}


def test_the_flash_backend_unpads_with_a_wait_only_when_not_handed_the_unpadding(work):
    from benchmarks import flash_standin
    from engine.tasks.pretrain import PretrainTask
    from engine.train import Trainer

    counter = HostWaitCounter()  # the stand-in's own reads of the offsets are flash-attn's kernel: one launch
    with flash_standin.installed((torch.float16, torch.bfloat16), launch=counter.one_launch):
        trainer = Trainer(tiny_config("flash", work, 1, 1), PretrainTask(), use_deepspeed=False)
        batch = next(iter(trainer.loader))
        assert batch.unpadding is not None  # the loader finds it for attn_backend "flash"
        inputs = batch.model_inputs()
        with counter, trainer.runtime.autocast():
            for given in (True, False):
                if not given:
                    inputs = {k: v for k, v in inputs.items() if k != "unpadding"}
                counter.phase = given
                out = trainer.model(**inputs)
                out.loss.backward()
    config = trainer.model.config
    regions_masked = batch.visual_attention_mask is not None
    masked_calls = config.l_layers + 2 * config.x_layers + (config.r_layers + config.x_layers) * regions_masked
    assert counter.counts.get(True, {}) == {}
    assert counter.counts[False] == {"nonzero": masked_calls, "item": masked_calls}  # each: the count, the longest


@pytest.mark.parametrize(
    "path, log_every",
    [
        ("eager", LOG_EVERY),
        ("sdpa", LOG_EVERY),
        pytest.param("triton", 3, marks=pytest.mark.slow),
        ("flash", LOG_EVERY),
    ],
)
def test_a_step_without_a_log_line_never_waits(work, path, log_every):
    """Two log windows (the interpreted Triton kernels' of 3 steps: each of its steps takes seconds here)."""
    counts = count_run(path, work, steps=2 * log_every, log_every=log_every)
    per_step = {step: sum(c.values()) for step, c in counts.items()}
    assert all(n == 0 for step, n in per_step.items() if step % log_every), per_step
    logged = (per_step[log_every], per_step[2 * log_every])
    assert 0 < max(logged) <= MAX_ON_A_LOG_STEP, per_step  # the log line's reads, counted


def report_row(path: str) -> tuple[int, int]:
    for line in REPORT.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == path:
            return int(cells[1]), int(cells[2])
    raise AssertionError(f"{REPORT} has no row for {path}")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeeds_waits_are_the_reported_ones(work):
    summary = summarise("zero1", count_run("zero1", work, steps=20, log_every=LOG_EVERY), LOG_EVERY)
    assert (summary["max_other"], summary["max_log"]) == report_row("zero1"), (summary, REPORT)
    assert (summary["max_other"], summary["max_log"]) == (1, 3), summary  # bf16: DeepSpeed's clip check only


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_the_training_forward_and_losses_have_no_graph_break(work, backend):
    from engine.tasks.pretrain import PretrainTask
    from engine.train import Trainer

    trainer = Trainer(tiny_config(backend, work, 1, 1), PretrainTask(), use_deepspeed=False)
    batch = next(iter(trainer.loader))

    def losses(**inputs):
        out = trainer.model(**inputs)
        return out.loss, out.losses

    explained = torch._dynamo.explain(losses)(**batch.model_inputs())
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1 and len(batch.mlm_rows) >= batch.masked_tokens > 0


def test_masked_rows_come_in_a_handful_of_bucket_sizes():
    from engine.data.batching import padded_rows, row_bucket

    sizes = {row_bucket(n) for n in range(470, 611)}  # about 3 sigma around 15% of 256 x 14 tokens
    assert len(sizes) <= 4 and all(row_bucket(n) >= n and row_bucket(n) - n < max(n, 64) / 8 for n in range(1, 5000))
    mask = torch.rand(37) < 0.3
    rows = padded_rows(mask.numpy())
    real = rows[rows >= 0]
    assert len(rows) == row_bucket(int(mask.sum())) and real.tolist() == mask.nonzero().squeeze(1).tolist()
    assert rows.dtype == np.int32
