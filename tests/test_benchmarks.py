"""benchmarks/: the shared harness, and benchmarks.kernels' CPU path (checks in the Triton interpreter, no timing).

Benchmarks are not timed tests: these only check that the scripts run and record what they should, so that the
GPU run (rare, one call) does not die on a typo. conftest.py turns the Triton interpreter on when there is no GPU.
"""

import json
import re
import shutil
import time

import pytest
import torch

import benchmarks.kernels as bench
from benchmarks import harness

CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------- harness


def test_environment_has_every_field_and_a_commit():
    env = harness.environment()
    expected = {"device", "measured_on", "host_cpu", "gpu_count", "cuda", "torch", "triton", "deepspeed", "dali"}
    expected |= {"transformers", "python", "commit", "date", "hostname", "cpu_count"}
    assert expected <= set(env)
    assert env["torch"] == torch.__version__ and env["cpu_count"] >= 1 and env["device"]
    if not CUDA:  # a CPU row can never pass for a GPU one
        assert env["device"] == "cpu" and env["measured_on"] == "cpu" and env["gpu_count"] == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", env["date"]), env["date"]
    json.dumps(env)  # every field is plain JSON
    if shutil.which("git") and (harness.REPO_ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", env["commit"]), env["commit"]


def test_commit_falls_back_to_the_environment_variable_without_git(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "REPO_ROOT", tmp_path)  # not a git checkout
    monkeypatch.setenv(harness.COMMIT_ENV, "abc123-dirty")
    assert harness.git_commit() == "abc123-dirty"


def test_append_rows_writes_json_lines_and_appends(tmp_path):
    path = tmp_path / "deeper" / "bench.jsonl"
    harness.append_rows(path, [{"a": 1, "dtype": torch.bfloat16}, {"b": [1.5, None]}])
    harness.append_rows(path, [{"c": "x"}])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"a": 1, "dtype": "torch.bfloat16"}, {"b": [1.5, None]}, {"c": "x"}]
    with path.open("a") as f:
        f.write('{"cut short by a ki')  # a killed run's last line
    assert harness.read_rows(path) == rows and harness.read_rows(tmp_path / "missing.jsonl") == []


def test_markdown_table():
    rows = [{"name": "a|b", "ms": 0.123456, "n": 3}, {"name": "c"}]
    table = harness.markdown_table(rows, ["name", ("ms", "time ms"), "n"])
    assert table.splitlines() == [
        "| name | time ms | n |",
        "|---|---|---|",
        "| a\\|b | 0.1235 | 3 |",
        "| c |  |  |",
    ]


def test_summarize_quantiles():
    stats = harness.summarize([5.0, 1.0, 3.0, 2.0, 4.0])  # linear interpolation between order statistics
    assert stats == pytest.approx({"median_ms": 3.0, "p20_ms": 1.8, "p80_ms": 4.2, "min_ms": 1.0, "reps": 5})


def test_time_cpu_medians_of_a_sleep_and_setup_is_not_timed():
    stats = harness.time_cpu(lambda: time.sleep(0.005), warmup=1, reps=5)
    assert stats["reps"] == 5 and stats["p20_ms"] <= stats["median_ms"] <= stats["p80_ms"]
    assert 4.5 <= stats["median_ms"] < 100, stats
    seen = []
    stats = harness.time_cpu(seen.append, warmup=1, reps=3, setup=lambda: time.sleep(0.03) or "fresh")
    assert seen == ["fresh"] * 4 and stats["median_ms"] < 20, stats


def test_step_clock_splits_a_step_into_phases():
    clock = harness.StepClock("cpu")
    time.sleep(0.01)
    clock.mark("data")
    time.sleep(0.02)
    clock.mark("forward")
    clock.mark("data")  # a phase seen twice accumulates
    assert list(clock.phases) == ["data", "forward"]
    assert 0.009 <= clock.phases["data"] < 0.1 and 0.019 <= clock.phases["forward"] < 0.1
    assert clock.total == pytest.approx(sum(clock.phases.values()))


def test_line_chart_draws_a_line_per_series_from_the_data(tmp_path):
    import xml.etree.ElementTree as ET

    from engine.plots import save_figure

    figure = harness.line_chart(
        {"a <b>": [(256, 30.0), (64, 10.0), (128, 25.0), (512, None)], "c": [(64, 5.0)]},
        "samples/s & batch",
        "batch size",
        "samples/s",
        log2_x=True,
    )
    (ax,) = figure.axes
    lines = {line.get_gid(): line for line in ax.get_lines()}
    assert set(lines) == {"series:a <b>", "series:c"}
    assert list(lines["series:a <b>"].get_xdata()) == [64, 128, 256]  # in x order, None left out
    assert list(lines["series:a <b>"].get_ydata()) == [10.0, 25.0, 30.0]
    assert all(line.get_marker() == "o" for line in lines.values())
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [64, 128, 256] and ax.get_ylim()[0] == 0
    assert ax.get_title() == "samples/s & batch"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a <b>", "c"]
    save_figure(figure, tmp_path / "chart.svg")
    ids = {e.get("id") for e in ET.parse(tmp_path / "chart.svg").getroot().iter()}  # escaped, well formed
    assert {"series:a <b>", "series:c"} <= ids
    with pytest.raises(ValueError):
        harness.line_chart({"empty": []}, "t", "x", "y")


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_time_cuda_and_peak_memory():
    x = torch.randn(4096, 4096, device="cuda")
    stats = harness.time_cuda(lambda: x @ x, warmup=2, reps=5)
    assert stats["reps"] == 5 and 0 < stats["median_ms"] < 1000
    assert harness.peak_memory(lambda: x @ x) >= 2 * x.numel() * 4


# ------------------------------------------------------------------------------------ benchmarks.kernels


@pytest.mark.skipif(CUDA, reason="the CPU path: a GPU runs the real-size checks instead")
@pytest.mark.parametrize("argv", [["--check-only"], ["--quick"]], ids=["check-only", "default-without-gpu"])
def test_kernels_cpu_path_checks_and_refuses_to_time(argv, tmp_path, capsys):
    out = tmp_path / "kernels.jsonl"
    assert bench.main(argv + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert bench.NO_GPU in printed
    assert re.search(r"checks: [1-9]\d* passed, 0 failed", printed) and "FAIL" not in printed
    assert not re.search(r"^timing ", printed, re.M) and not out.exists() and not out.with_suffix(".md").exists()


def test_a_wrong_kernel_fails_its_check(monkeypatch):
    off_by_a_thousandth = lambda q, k, v, mask: bench.kernels.reference_attention(q, k, v, mask) * 1.001  # noqa: E731
    monkeypatch.setattr(bench.kernels, "cross_attention", off_by_a_thousandth)
    cfg = bench.AttentionConfig(1, 3, 5, True, heads=1, head_dim=16)
    result = bench.check_attention(cfg, torch.float32, torch.device("cpu"))
    assert not result["passed"] and result["errors"]["out"] > 1e-5


def test_main_exits_nonzero_when_a_check_fails(monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_checks", lambda device, tiny: [{"bench": "check", "check": "x", "passed": False}])
    assert bench.main(["--check-only"]) == 1
    assert "1 failed" in capsys.readouterr().out


def test_timing_sweep_and_report_on_cpu(tmp_path, monkeypatch):
    """The GPU sweep's plumbing (inputs, providers, modes, rows, report) with the CPU timer at tiny sizes."""
    one_way = bench.AttentionConfig(1, 4, 6, True, heads=1, head_dim=16)
    both_ways = bench.AttentionConfig(1, 4, 6, True, bidirectional=True, heads=1, head_dim=16)
    features = bench.FeatureConfig(1, "bf16", regions=8, hidden=16, features=32)
    monkeypatch.setattr(bench, "attention_configs", lambda quick: [one_way, both_ways])
    monkeypatch.setattr(bench, "feature_configs", lambda quick: [features])
    monkeypatch.setattr(bench, "SINGLE_PROVIDERS", ["triton", "eager", "flash_attn"])
    monkeypatch.setattr(bench, "BIDIRECTIONAL_PROVIDERS", ["triton_bidirectional", "eager x2"])
    out = tmp_path / "kernels.jsonl"
    rows = bench.sweep(True, torch.device("cpu"), harness.time_cpu, 0, 1, out, {"commit": "test"})
    assert [json.loads(line) for line in out.read_text().splitlines()] == json.loads(json.dumps(rows))

    timed = {(r["config"], r["provider"], r["mode"]) for r in rows if r.get("median_ms", 0) > 0}
    expected = [(one_way.name, "triton"), (one_way.name, "eager"), (both_ways.name, "triton_bidirectional")]
    expected += [(both_ways.name, "eager x2")] + [(features.name, p) for p in bench.FEATURE_PROVIDERS]
    for config, provider in expected:
        assert {(config, provider, m) for m in ("forward", "backward", "full")} <= timed, (config, provider)
    flash = [r for r in rows if r["provider"] == "flash_attn"]
    assert len(flash) == 3 or (len(flash) == 1 and flash[0]["note"]), flash  # timed, or skipped with a reason
    assert all(r["tflops"] > 0 and r["gbps"] > 0 for r in rows if r["bench"] == "attention" and r["mode"])
    assert all(r["commit"] == "test" for r in rows)

    assert [s["ours"] for s in bench.speedups(bench.pivot(rows))] == ["triton", "triton_bidirectional", "triton_fused"]
    env = {"device": "cpu", "torch": "x", "triton": "y", "cuda": None, "commit": "test", "date": "today"}
    text = bench.report(rows, env, 0, 1, checks_passed=True)
    assert text.count("\n## ") == 3 and "| triton_bidirectional |" in text


def test_flop_and_byte_counts():
    cfg = bench.AttentionConfig(2, 20, 36, False, heads=12, head_dim=64)
    assert cfg.flops("forward") == 4 * 2 * 12 * 20 * 36 * 64 and cfg.flops("backward") == 2.5 * cfg.flops("forward")
    both = bench.AttentionConfig(2, 20, 36, True, bidirectional=True)
    assert both.flops("forward") == 2 * cfg.flops("forward")
    # bf16 forward: q and o (20 rows each), k and v (36 rows each), 2 bytes an element
    assert cfg.min_bytes("forward") == 2 * 12 * 64 * 2 * (2 * 20 + 2 * 36)
