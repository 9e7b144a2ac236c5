"""benchmarks.throughput end to end on the CPU (--smoke: a tiny model, two steps), and its pieces.

Not a timed test: the numbers of a smoke run mean nothing, but they must be consistent with each other (tokens/s,
TFLOP/s, MFU, the breakdown), carry every field a GPU row will carry, say they come from a CPU, and transformers and
ours must compute the same loss on the same weights and batch. One smoke run (~10 s) feeds every test here.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import pytest
import torch

from benchmarks import throughput as tp
from engine.flops import step_flops

CUDA = torch.cuda.is_available()
ENV_FIELDS = {"device", "gpu_count", "torch", "triton", "deepspeed", "dali", "transformers", "commit", "date"}
CONFIG_FIELDS = {
    "impl",
    "attn",
    "precision",
    "batch",
    "compile",
    "cudagraphs",
    "loader",
    "workers",
    "zero",
    "text_len",
    "regions",
    "hidden_size",
    "layers",
    "warmup",
    "steps",
    "breakdown_steps",
    "optimizer",
    "grad_clip",
}
NUMBER_FIELDS = {
    "samples_per_s",
    "tokens_per_s",
    "step_ms",
    "flops_per_step",
    "tflops",
    "peak_tflops",
    "peak_source",
    "mfu",
    "data_wait_share",
    "peak_memory_gib",
    "breakdown_ms",
    "breakdown_step_ms",
    "loss_first",
    "loss_last",
    "skipped_steps",
}
IMAGES, PEAK_TFLOPS = 12, 1.0


@pytest.fixture(scope="module")
def smoke(throughput_smoke):
    """tests/conftest.py's one run of `python -m benchmarks.throughput --smoke` (peak 1 TFLOP/s, 12 images)."""
    if CUDA:
        pytest.skip("the smoke run is the CPU path")
    out, proc = throughput_smoke["out"] / "throughput_smoke_cpu.jsonl", throughput_smoke["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {"root": throughput_smoke["out"], "out": out, "rows": rows}


def throughput_rows(smoke) -> list[dict]:
    return [r for r in smoke["rows"] if r["kind"] == "throughput"]


def timed_rows(smoke) -> list[dict]:
    return [r for r in throughput_rows(smoke) if r.get("samples_per_s")]


def test_every_variant_has_a_row_timed_or_skipped_with_a_reason(smoke):
    rows = throughput_rows(smoke)
    headline = ["hf fp32 b2", "ours-eager fp32 b2", "ours-sdpa fp32 b2", "ours-flash fp32 b2"]
    assert [r["name"] for r in rows[:4]] == headline
    # then the fastest of ours in the headline group under DeepSpeed ZeRO-1 in bf16, with CUDA graphs, with each
    # loader (transformers first) and compiled
    best = max(
        (r for r in rows[:4] if r["impl"] == "ours" and r.get("samples_per_s")), key=lambda r: r["samples_per_s"]
    )
    b = f"ours-{best['attn']}"
    assert [r["name"] for r in rows[4:]] == [
        f"{b}+zero1 bf16 b2",
        f"{b}+cudagraphs fp32 b2",
        "hf fp32 b2 torch",
        f"{b} fp32 b2 torch",
        "hf fp32 b2 gpu",
        f"{b} fp32 b2 gpu",
        "hf fp32 b2 dalix2",
        f"{b} fp32 b2 dalix2",
        f"{b}+compile fp32 b2",
    ]
    for row in rows:
        if row.get("samples_per_s") is None:
            assert row["note"].startswith("skipped: "), row
    skipped = {r["name"]: r["note"] for r in rows if not r.get("samples_per_s")}
    assert set(skipped) == {"ours-flash fp32 b2", f"{b}+compile fp32 b2", f"{b}+cudagraphs fp32 b2"}
    assert "bf16 / fp16 only" in skipped["ours-flash fp32 b2"]
    assert "GPU only" in skipped[f"{b}+compile fp32 b2"] and "GPU only" in skipped[f"{b}+cudagraphs fp32 b2"]


def test_rows_carry_environment_config_and_say_cpu_smoke(smoke):
    for row in smoke["rows"]:
        assert ENV_FIELDS <= set(row), ENV_FIELDS - set(row)
        assert row["device"] == "cpu" and row["gpu_count"] == 0 and row["measured_on"] == "cpu"
        assert (
            row["smoke"] is True
            and row["note"]
            and ("not a GPU measurement" in row["note"] or "skipped" in row["note"])
        )
        assert row["torch"] == torch.__version__
    for row in timed_rows(smoke):
        assert (CONFIG_FIELDS | NUMBER_FIELDS) <= set(row), (CONFIG_FIELDS | NUMBER_FIELDS) - set(row)
        assert row["text_len"] == 20 and row["regions"] == 36 and row["hidden_size"] == 32
        assert row["losses_finite"] and row["skipped_steps"] == 0


def test_throughput_arithmetic_is_consistent(smoke):
    for row in timed_rows(smoke):
        assert row["samples_per_s"] == pytest.approx(row["batch"] / (row["step_ms"] / 1e3), rel=1e-9)
        assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * (20 + 36), rel=1e-12)
        assert row["tflops"] == pytest.approx(row["flops_per_step"] / (row["step_ms"] / 1e3) / 1e12, rel=1e-9)
        assert row["peak_tflops"] == PEAK_TFLOPS and "--peak-tflops" in row["peak_source"]
        assert row["mfu"] == pytest.approx(row["tflops"] / row["peak_tflops"], rel=1e-12)
        assert 0 <= row["data_wait_share"] < 1
        phases = row["breakdown_ms"]
        assert set(phases) == {"data", "forward", "backward", "optimizer"} and min(phases.values()) >= 0
        assert sum(phases.values()) == pytest.approx(row["breakdown_step_ms"], rel=1e-9)


def test_flops_are_engine_flops_of_the_batches_timed(smoke):
    """Resident data cycles 4 batches: 1 warm-up step, then the 2 timed steps read batches 1 and 2."""
    rows = [r for r in timed_rows(smoke) if r["loader"] == "resident"]
    config = tp.model_config(tp.parse_args(["--smoke"]))
    stores = tp.Stores(smoke["root"] / "data", IMAGES, config.visual_feat_dim, torch.device("cpu"), config.vocab_size)
    batches = stores.resident(2)
    assert all(b.input_ids.shape == (2, 20) for b in batches)
    expected = (tp.batch_flops(config, batches[1]) + tp.batch_flops(config, batches[2])) / 2
    lower = step_flops(config, "pretrain", 2, 20, 36, masked_tokens=0, masked_regions=0).total
    assert expected > lower
    for row in rows:
        assert row["flops_per_step"] == expected, row["name"]  # the same FLOPs for transformers and ours


def test_speedup_is_ours_over_transformers_on_the_same_data(smoke):
    rows = timed_rows(smoke)
    hf = {(r["precision"], r["batch"], r["loader"]): r["samples_per_s"] for r in rows if r["impl"] == "hf"}
    ours = [r for r in rows if r["impl"] == "ours"]
    assert len(ours) == 6
    for row in ours:
        if row["zero"]:  # bf16: transformers ran fp32 only
            assert "speedup_vs_hf" not in row
            continue
        assert row["speedup_vs_hf"] == pytest.approx(
            row["samples_per_s"] / hf[(row["precision"], row["batch"], row["loader"])]
        )


def test_the_deepspeed_row_steps_the_same_model_on_the_same_batches(smoke):
    """The ZeRO-1 bf16 row runs the engine's DeepSpeed path: the first step's loss (same weights and batch, another
    precision and dropout draw) is the plain rows', and its steps were applied, not skipped."""
    rows = [r for r in timed_rows(smoke) if r["loader"] == "resident"]
    (ds,) = [r for r in rows if r["zero"]]
    assert ds["impl"] == "ours" and ds["precision"] == "bf16" and ds["skipped_steps"] == 0
    plain = [r["loss_first"] for r in rows if not r["zero"]]
    assert ds["loss_first"] == pytest.approx(sum(plain) / len(plain), rel=0.02)


def test_transformers_and_ours_compute_the_same_loss_on_the_same_weights_and_batch(smoke):
    (parity,) = [r for r in smoke["rows"] if r["kind"] == "parity"]
    assert parity["precision"] == "fp32" and parity["rel_diff"] <= 1e-6, parity
    assert set(parity["loss_components_ours"]) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    assert parity["loss_ours"] == pytest.approx(sum(parity["loss_components_ours"].values()), rel=1e-6)


def test_summary_plot_and_profile_are_written_and_labelled(smoke):
    out = smoke["out"]
    md = out.with_suffix(".md").read_text()
    assert "not a GPU measurement" in md and "Best of ours" in md and "## Step-time breakdown" in md
    svg = ET.fromstring(out.with_suffix(".svg").read_text())
    lines = [e for e in svg.iter() if (e.get("id") or "").startswith("series:")]
    # hf, ours-eager, ours-sdpa and the best of them under ZeRO-1 on resident data (one point each)
    (zero,) = [r["attn"] for r in throughput_rows(smoke) if r["zero"]]
    assert {e.get("id") for e in lines} == {
        "series:hf (AMP) fp32",
        "series:ours-eager fp32",
        "series:ours-sdpa fp32",
        f"series:ours-{zero}+zero1 bf16",
    }
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    profile = out.with_name(out.stem + "_profile.md").read_text()
    assert "not a GPU measurement" in profile and "## By kind" in profile and "| 1 |" in profile


def test_padded_text_keeps_the_flash_unpadding_of_its_masks(smoke):
    """The resident batches are padded to 20 tokens after the loader found their unpadding: it must be the
    padded masks' own (what Unpadding.from_masks finds), or the flash rows would attend to the wrong keys."""
    from lxmert.attention import Unpadding

    config = tp.model_config(tp.parse_args(["--smoke"]))
    stores = tp.Stores(smoke["root"] / "data", IMAGES, config.visual_feat_dim, torch.device("cpu"), config.vocab_size)
    from engine.data.loaders import make_loader

    loader = make_loader("torch", stores.text, stores.regions, stores.sampling(3), "cpu", unpadding=True)
    raw = next(iter(loader))
    assert raw.input_ids.shape[1] < tp.TEXT_LEN  # padding happens
    for batch in [tp.pad_text(raw, tp.TEXT_LEN), *stores.resident(2)]:
        want = Unpadding.from_masks(batch.attention_mask, batch.visual_attention_mask, batch.visual_feats.shape[1])
        got = batch.unpadding
        for name in ("language", "cross"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.shape == b.shape and a.max_seqlen == b.max_seqlen, name
            assert torch.equal(a.indices, b.indices) and torch.equal(a.cu_seqlens, b.cu_seqlens), name
        assert (got.regions is None) == (want.regions is None)
    assert "unpadding" not in tp.hf_inputs(raw)


def test_transformers_inputs_use_its_ignore_index():
    batch = tp.PretrainBatch(
        input_ids=torch.tensor([[101, 5, 0]]),
        attention_mask=torch.tensor([[1, 1, 0]]),
        token_type_ids=torch.zeros(1, 3),
        visual_feats=torch.zeros(1, 2, 4),
        visual_pos=torch.zeros(1, 2, 4),
        visual_attention_mask=None,
        labels=torch.tensor([[-1, 7, -1]]),
        obj_labels={
            "obj": (torch.tensor([[3, -1]]), torch.ones(1, 2)),
            "attr": (torch.tensor([[-1, 2]]), torch.ones(1, 2)),
            "feat": (torch.zeros(1, 2, 4), torch.tensor([[1.0, 0.0]])),
        },
        matched_label=torch.tensor([1]),
        ans=torch.tensor([-1]),
        mlm_rows=torch.tensor([1, -1]),
        feat_rows=torch.tensor([0, -1]),
        sample_index=None,
        sentence_index=None,
        image_index=None,
        epoch=0,
        step=0,
        masked_tokens=1,
        masked_regions=1,
    )
    inputs = tp.hf_inputs(batch)
    assert inputs["labels"].tolist() == [[-100, 7, -100]] and inputs["ans"].tolist() == [-100]
    assert inputs["obj_labels"]["obj"][0].tolist() == [[3, -100]] and inputs["obj_labels"]["attr"][0].tolist() == [
        [-100, 2]
    ]
    assert "visual_attention_mask" not in inputs and batch.labels.tolist() == [[-1, 7, -1]]  # the batch is untouched
    padded = tp.pad_text(batch, 5)
    assert padded.input_ids.tolist() == [[101, 5, 0, 0, 0]] and padded.attention_mask.tolist() == [[1, 1, 0, 0, 0]]
    assert padded.labels.tolist() == [[-1, 7, -1, -1, -1]] and padded.token_type_ids.shape == (1, 5)
    assert padded.mlm_rows.tolist() == [1, -1] and "mlm_rows" not in inputs and "feat_rows" not in inputs


@pytest.mark.skipif(CUDA, reason="the refusal is the CPU path")
def test_the_full_sweep_refuses_to_run_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "throughput.jsonl"
    assert tp.main(["--out", str(out)]) == 2
    assert "only runs on a GPU" in capsys.readouterr().out and not out.exists()


def test_plan_puts_the_headline_first_and_transformers_first_in_it():
    args = tp.parse_args([])
    headline, rest = tp.plan(args)
    assert [v.name for v in headline] == [
        "hf bf16 b256",
        "ours-eager bf16 b256",
        "ours-sdpa bf16 b256",
        "ours-triton bf16 b256",
        "ours-flash bf16 b256",
    ]
    assert {(v.precision, v.batch) for v in rest} == {
        ("bf16", 64),
        ("bf16", 128),
        ("fp16", 64),
        ("fp16", 128),
        ("fp16", 256),
        ("fp32", 256),
        ("tf32", 256),
    }
    assert not math.isnan(args.time_budget) and args.steps == 20 and args.warmup == 5
