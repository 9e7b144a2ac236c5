"""engine/metrics_log.py and engine/plots.py: TensorBoard scalars (a fake writer; real event files when the
tensorboard package is installed), the missing-TensorBoard notice, the progress bar, and the SVG plots read back
as XML: one path per series, its points mapped monotonically from the data, resumed logs de-duplicated."""

from __future__ import annotations

import io
import json
import math
import re
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from engine import metrics_log
from engine.metrics_log import MetricsLog, tensorboard_scalars
from engine.plots import main, read_metrics, write_plots

SVG = "{http://www.w3.org/2000/svg}"


def train_record(step: int, loss: float, **fields) -> dict:
    record = {"step": step, "total_steps": 100, "loss": loss, "losses": {"mlm": 0.6 * loss, "obj": 0.4 * loss},
              "lr": 1e-4, "grad_norm": 1.5, "samples_per_s": 100.0 + step, "mfu": 0.3, "skipped": False}  # fmt: skip
    return {**record, **fields}


def write_jsonl(path: Path, records: list, extra_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for index, line in sorted((extra_lines or {}).items()):
        lines.insert(index, line)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def series_of(svg: Path) -> dict[tuple[str, str], list[list[tuple[float, float]]]]:
    """{(series, kind): its subpaths, each a list of (x, y)}; asserts one path per series."""
    root = ET.parse(svg).getroot()
    out: dict[tuple[str, str], list[list[tuple[float, float]]]] = {}
    for path in root.iter(f"{SVG}path"):
        key = (path.get("data-series"), path.get("data-kind"))
        assert key not in out, f"two paths for {key}"
        subpaths: list[list[tuple[float, float]]] = []
        for command, x, y in re.findall(r"([ML])(-?[\d.]+),(-?[\d.]+)", path.get("d")):
            if command == "M":
                subpaths.append([])
            subpaths[-1].append((float(x), float(y)))
        out[key] = subpaths
    return out


def points(subpaths: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    return [p for sub in subpaths for p in sub]


def assert_maps_monotonically(steps: list[int], values: list[float], xy: list[tuple[float, float]]) -> None:
    """x grows with the step; y shrinks as the value grows (SVG's y points down); equal values, equal y."""
    assert len(xy) == len(steps) == len(values)
    xs = [x for x, _ in xy]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    for (v1, (_, y1)), (v2, (_, y2)) in zip(zip(values, xy), zip(values[1:], xy[1:])):
        assert (v1 < v2) == (y1 > y2) and (v1 == v2) == math.isclose(y1, y2, abs_tol=0.011)
    assert xy[values.index(max(values))][1] == min(y for _, y in xy)


def assert_finite_coordinates(svg: Path) -> None:
    for element in ET.parse(svg).getroot().iter():
        for name in ("x", "y", "x1", "x2", "y1", "y2", "cx", "cy"):
            if element.get(name) is not None:
                assert math.isfinite(float(element.get(name))), (element.tag, element.attrib)
        for number in re.findall(r"[^\s,ML]+", element.get("d") or ""):
            assert math.isfinite(float(number)), element.attrib


# ---- plots ------------------------------------------------------------------------------------------------


def test_loss_plot_has_one_path_per_series_mapped_from_the_data(tmp_path):
    losses = [9.0, 7.5, 8.0, 4.0, 3.5, 3.5, 2.0]
    steps = [10 * (i + 1) for i in range(len(losses))]
    evals = [{"kind": "eval", "step": 30, "loss": 7.0, "losses": {"mlm": 4.0}, "accuracy": 0.4},
             {"kind": "eval", "step": 70, "loss": 2.5, "losses": {"mlm": 1.5}, "accuracy": 0.6}]  # fmt: skip
    records = [train_record(s, v) for s, v in zip(steps, losses)]
    metrics = write_jsonl(tmp_path / "metrics.jsonl", records[:3] + evals[:1] + records[3:] + evals[1:])
    loss_svg, throughput_svg = write_plots(metrics, tmp_path / "plots")
    assert loss_svg == tmp_path / "plots" / "loss.svg" and throughput_svg.name == "throughput.svg"
    series = series_of(loss_svg)
    assert set(series) == {("loss", "train"), ("losses/mlm", "train"), ("losses/obj", "train"),
                           ("loss", "eval"), ("losses/mlm", "eval")}  # fmt: skip
    assert_maps_monotonically(steps, losses, points(series["loss", "train"]))
    assert_maps_monotonically(steps, [0.6 * v for v in losses], points(series["losses/mlm", "train"]))
    assert_maps_monotonically([30, 70], [7.0, 2.5], points(series["loss", "eval"]))
    assert all(len(sub) == 1 for sub in [series["loss", "train"], series["loss", "eval"]])  # no break
    # one axis for every series: a train and an eval point of the same step and value coincide
    train_x = dict(zip(steps, [x for x, _ in points(series["loss", "train"])]))
    assert [x for x, _ in points(series["loss", "eval"])] == [train_x[30], train_x[70]]
    root = ET.parse(loss_svg).getroot()
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert {"loss (train)", "mlm (train)", "obj (train)", "loss (eval)", "mlm (eval)", "step"} <= set(labels)
    assert {"10", "40", "70"} & set(labels)  # step ticks labelled
    eval_path = next(p for p in root.iter(f"{SVG}path") if p.get("data-kind") == "eval")
    assert eval_path.get("stroke-dasharray")  # eval drawn differently from train
    markers = [g for g in root.iter(f"{SVG}g") if g.get("class") == "markers" and g.get("data-series") == "loss"]
    assert len(markers) == 1 and len(markers[0]) == 2  # eval points marked


def test_log_y_maps_by_logarithm(tmp_path):
    steps, losses = [1, 2, 3], [100.0, 10.0, 1.0]
    metrics = write_jsonl(tmp_path / "metrics.jsonl", [train_record(s, v) for s, v in zip(steps, losses)])
    loss_svg, _ = write_plots(metrics, tmp_path, log_y=True)
    xy = points(series_of(loss_svg)["loss", "train"])
    assert_maps_monotonically(steps, losses, xy)
    assert math.isclose(xy[0][1] - xy[1][1], xy[1][1] - xy[2][1], rel_tol=1e-3)  # equal ratios, equal gaps
    labels = {t.text for t in ET.parse(loss_svg).getroot().iter(f"{SVG}text")}
    assert {"1", "10", "100"} <= labels


def test_throughput_plot_samples_and_mfu(tmp_path):
    records = [train_record(s, 1.0, samples_per_s=v, mfu=m) for s, v, m in [(1, 50.0, 0.2), (2, 80.0, 0.25),
                                                                             (3, 70.0, 0.5)]]  # fmt: skip
    _, throughput_svg = write_plots(write_jsonl(tmp_path / "metrics.jsonl", records), tmp_path)
    series = series_of(throughput_svg)
    assert set(series) == {("samples_per_s", "train"), ("mfu", "train")}
    assert_maps_monotonically([1, 2, 3], [50.0, 80.0, 70.0], points(series["samples_per_s", "train"]))
    assert_maps_monotonically([1, 2, 3], [0.2, 0.25, 0.5], points(series["mfu", "train"]))
    groups = ET.parse(throughput_svg).getroot().iter(f"{SVG}g")
    panels = [g.get("data-title") for g in groups if g.get("class") == "panel"]
    assert panels == ["throughput", "model FLOPs utilisation"]
    # the CPU logs "mfu": null: no MFU panel
    records = [train_record(s, 1.0, mfu=None) for s in (1, 2)]
    _, throughput_svg = write_plots(write_jsonl(tmp_path / "metrics.jsonl", records), tmp_path)
    assert set(series_of(throughput_svg)) == {("samples_per_s", "train")}


def test_resumed_log_keeps_the_last_record_per_step(tmp_path):
    first = [train_record(s, 10.0 - s) for s in range(1, 7)] + [{"kind": "eval", "step": 6, "loss": 1.0}]
    # resumed from a checkpoint at step 3, killed again after step 5: the old steps 4-6 and eval 6 are stale
    second = [train_record(s, 20.0 - s) for s in range(4, 6)]
    metrics = write_jsonl(tmp_path / "metrics.jsonl", first + second)
    train, evals = read_metrics(metrics)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5] and evals == []
    assert [r["loss"] for r in train] == [9.0, 8.0, 7.0, 16.0, 15.0]
    # resumed again from step 3, now running to the end with an eval at step 6
    third = [train_record(s, 30.0 - s) for s in range(4, 8)] + [{"kind": "eval", "step": 6, "loss": 2.0}]
    metrics = write_jsonl(tmp_path / "metrics.jsonl", first + second + third)
    train, evals = read_metrics(metrics)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in train] == [9.0, 8.0, 7.0, 26.0, 25.0, 24.0, 23.0]
    assert [(r["step"], r["loss"]) for r in evals] == [(6, 2.0)]
    series = series_of(write_plots(metrics, tmp_path)[0])
    assert_maps_monotonically(list(range(1, 8)), [r["loss"] for r in train], points(series["loss", "train"]))
    assert len(points(series["loss", "eval"])) == 1


def test_non_finite_and_missing_values(tmp_path):
    """MetricsLog writes nan/inf as strings; plots leave those points out and break the line there; null or
    missing fields just have no point."""
    log = MetricsLog(tmp_path, tensorboard=False)
    values = [5.0, float("nan"), 4.0, float("inf"), 3.0, None, 2.0]
    for step, value in enumerate(values, 1):
        log.write({"step": step, "loss": torch.tensor(value) if value is not None else None,
                   "losses": {"mlm": 1.0, "obj": float("nan")}})  # fmt: skip
    log.write({"step": 8})  # no loss at all
    log.close()
    assert '"loss": "nan"' in (tmp_path / "metrics.jsonl").read_text()
    series = series_of(write_plots(tmp_path / "metrics.jsonl", tmp_path)[0])
    subpaths = series["loss", "train"]
    assert [len(sub) for sub in subpaths] == [1, 1, 2]  # 5 | 4 | 3, 2 (null: no point, no break)
    assert_maps_monotonically([1, 3, 5, 7], [5.0, 4.0, 3.0, 2.0], points(subpaths))
    assert series["losses/obj", "train"] == []  # all nan: an empty path ...
    labels = {t.text for t in ET.parse(tmp_path / "loss.svg").getroot().iter(f"{SVG}text")}
    assert "obj (train): no finite values" in labels  # ... and the legend says why
    assert_finite_coordinates(tmp_path / "loss.svg")


def test_empty_and_single_record_logs(tmp_path):
    metrics = write_jsonl(tmp_path / "metrics.jsonl", [])
    for svg in write_plots(metrics, tmp_path):
        root = ET.parse(svg).getroot()
        assert "no data" in {t.text for t in root.iter(f"{SVG}text")}
        assert list(root.iter(f"{SVG}path")) == []
    metrics = write_jsonl(tmp_path / "metrics.jsonl", [train_record(5, 2.0)])
    loss_svg, throughput_svg = write_plots(metrics, tmp_path)
    for svg in (loss_svg, throughput_svg):
        for subpaths in series_of(svg).values():
            assert len(points(subpaths)) == 1
        assert_finite_coordinates(svg)
    circles = [c for g in ET.parse(loss_svg).getroot().iter(f"{SVG}g") if g.get("class") == "markers" for c in g]
    assert len(circles) == 3  # a lone point gets a marker (a one-point line draws nothing)


def test_malformed_lines_are_skipped_with_a_warning_naming_them(tmp_path):
    records = [train_record(s, 5.0 - s) for s in (1, 2, 3)]
    metrics = write_jsonl(tmp_path / "metrics.jsonl", records,
                          extra_lines={1: '{"step": 2, "loss"', 3: "[1, 2]", 4: '{"loss": 1.0}'})  # fmt: skip
    with pytest.warns(UserWarning) as caught:
        train, _ = read_metrics(metrics)
    assert [r["step"] for r in train] == [1, 2, 3]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3
    assert messages[0].startswith(f"{metrics}:2: skipped a line that is not JSON")
    assert messages[1].startswith(f"{metrics}:4: skipped a line that is not a JSON object")
    assert messages[2].startswith(f"{metrics}:5: skipped a train record without an integer step")


def test_cli(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    metrics = write_jsonl(run / "metrics.jsonl", [train_record(s, 1.0 / s) for s in (1, 2)])
    main([str(metrics)])
    assert capsys.readouterr().out.split() == [str(run / "loss.svg"), str(run / "throughput.svg")]
    main([str(metrics), "--out", str(tmp_path / "elsewhere"), "--log-y"])
    assert (tmp_path / "elsewhere" / "loss.svg").is_file() and (tmp_path / "elsewhere" / "throughput.svg").is_file()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.jsonl")])


# ---- TensorBoard ----------------------------------------------------------------------------------------


class FakeWriter:
    instances: list[FakeWriter] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_writer(monkeypatch):
    FakeWriter.instances = []
    monkeypatch.setattr(metrics_log, "_load_summary_writer", lambda: (FakeWriter, ""))
    return FakeWriter


def test_tensorboard_scalars_match_the_records(tmp_path, fake_writer):
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"step": 10, "total_steps": 20, "epoch": 0.5, "loss": torch.tensor(3.0),
               "losses": {"mlm": 2.0, "obj": float("nan")}, "lr": 1e-3, "grad_norm": float("inf"),
               "loss_scale": None, "skipped": False, "skipped_steps": 1, "samples_per_s": 812.5,
               "tokens_per_s": 45000.0, "tflops": 1.25, "mfu": None, "data_wait_share": 0.03,
               "peak_memory_gib": 1.5, "note": "text"})  # fmt: skip
    log.write({"kind": "eval", "step": 20, "loss": 2.5, "losses": {"mlm": 1.5}, "accuracy": 0.61})
    log.write({"kind": "train", "step": 20, "loss": 2.0})
    log.close()
    (writer,) = fake_writer.instances
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    assert writer.scalars == [
        ("epoch", 0.5, 10), ("loss", 3.0, 10), ("losses/mlm", 2.0, 10), ("lr", 1e-3, 10), ("skipped_steps", 1.0, 10),
        ("samples_per_s", 812.5, 10), ("tokens_per_s", 45000.0, 10), ("tflops", 1.25, 10),
        ("data_wait_share", 0.03, 10), ("peak_memory_gib", 1.5, 10),
        ("eval/loss", 2.5, 20), ("eval/losses/mlm", 1.5, 20), ("eval/accuracy", 0.61, 20),
        ("loss", 2.0, 20),
    ]  # fmt: skip
    assert tensorboard_scalars({"kind": "eval", "step": 3, "metric": 0.7}) == {"eval/metric": 0.7}


def test_tensorboard_off(tmp_path, fake_writer):
    MetricsLog(tmp_path, tensorboard=False).close()
    MetricsLog(tmp_path, enabled=False).close()  # other ranks write nothing
    assert fake_writer.instances == []


def test_missing_tensorboard_is_silent_and_a_broken_one_gives_one_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: `import tensorboard` fails
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setattr(metrics_log, "_tensorboard_notice_given", False)
    for run in ("a", "b"):
        log = MetricsLog(tmp_path / run)
        log.write({"step": 1, "loss": 1.0})
        log.close()
        assert (tmp_path / run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
        assert not (tmp_path / run / "tensorboard").exists()
    assert "TensorBoard" not in capsys.readouterr().out  # an optional extra that is absent: nothing to say
    # installed but broken (here: a package without a version): one notice for the process, the runs go on
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    for run in ("c", "d"):
        monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
        log = MetricsLog(tmp_path / run)
        log.write({"step": 1, "loss": 1.0})
        log.close()
        assert (tmp_path / run / "metrics.jsonl").is_file() and not (tmp_path / run / "tensorboard").exists()
    notices = [line for line in capsys.readouterr().out.splitlines() if "TensorBoard" in line]
    assert len(notices) == 1, notices
    assert notices[0].startswith("TensorBoard logging off: torch.utils.tensorboard did not import (")
    assert notices[0].endswith("); pip install tensorboard to have it")


def test_real_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path)
    log.write({"step": 1, "loss": 3.0, "losses": {"mlm": 2.0}})
    log.write({"step": 2, "loss": 2.0, "losses": {"mlm": 1.0}})
    log.write({"kind": "eval", "step": 2, "loss": 2.5})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 3.0), (2, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("losses/mlm")] == [(1, 2.0), (2, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(2, 2.5)]


# ---- progress bar -----------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_samples_per_s_and_eta_on_a_terminal(tmp_path, monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    log = MetricsLog(tmp_path, progress_total=10, progress_initial=2, tensorboard=False)
    log.advance(1)
    log.advance(0, samples_per_s=456.7)  # a logging step
    log.advance(1)
    log.console("step 4 | loss 1.0")
    log.close()
    bar = terminal.getvalue()
    assert "456.7 samples/s" in bar and re.search(r"4/10 \[\d\d:\d\d<\d\d:\d\d", bar), bar  # n/total [elapsed<ETA
    assert "step 4 | loss 1.0" in capsys.readouterr().out


def test_no_progress_bar_off_a_terminal(tmp_path, monkeypatch, capsys):
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    log = MetricsLog(tmp_path, progress_total=10, tensorboard=False)
    log.advance(1, samples_per_s=10.0)
    log.write(train_record(1, 1.0))
    log.console("step 1 | loss 1.0")
    log.close()
    assert pipe.getvalue() == "" and capsys.readouterr().out == "step 1 | loss 1.0\n"


def test_loss_plot_has_a_panel_per_component_and_the_fine_tuning_score(tmp_path):
    """The total of six losses is many times the smallest: each component gets its own panel (and scale); a
    fine-tuning log's evaluation score gets one too."""
    records = [train_record(s, 10.0 / s) for s in (1, 2, 3)]
    evals = [{"kind": "eval", "step": 3, "epoch": 1, "metric": 0.25, "metric_name": "vqa_score"},
             {"kind": "eval", "step": 6, "epoch": 2, "metric": 0.5, "metric_name": "vqa_score"}]  # fmt: skip
    loss_svg, _ = write_plots(write_jsonl(tmp_path / "metrics.jsonl", records + evals), tmp_path)
    root = ET.parse(loss_svg).getroot()
    panels = [g for g in root.iter(f"{SVG}g") if g.get("class") == "panel"]
    assert [p.get("data-title") for p in panels] == ["loss (total of the components)", "mlm loss", "obj loss",
                                                     "evaluation: vqa_score"]  # fmt: skip
    in_panel = {p.get("data-title"): {q.get("data-series") for q in p.iter(f"{SVG}path")} for p in panels}
    assert in_panel["mlm loss"] == {"losses/mlm"} and in_panel["evaluation: vqa_score"] == {"metric"}
    # each panel spans its own range: the component's extremes reach the panel's top and bottom like the total's
    series = series_of(loss_svg)
    ys = {name: [y for _, y in points(series[name, "train"])] for name in ("loss", "losses/obj")}
    assert math.isclose(max(ys["loss"]) - min(ys["loss"]), max(ys["losses/obj"]) - min(ys["losses/obj"]), rel_tol=1e-3)
    assert_maps_monotonically([3, 6], [0.25, 0.5], points(series["metric", "eval"]))


def test_console_line_shows_a_zero_lr_as_zero_and_the_time_left():
    from engine.metrics_log import console_line, format_duration

    line = console_line({**train_record(10, 1.0), "lr": -0.0, "eta_s": 3725.4, "peak_memory_gib": 1.0})
    assert "lr 0.00e+00" in line and "eta 1:02:05" in line
    assert "TFLOP/s" not in console_line({"step": 1, "total_steps": 2, "loss": 1.0, "lr": 1e-4, "grad_norm": 1.0,
                                           "samples_per_s": 5.0, "peak_memory_gib": 0.1})  # fields a record lacks
    assert format_duration(90061) == "1 d 1:01:01" and format_duration(0.4) == "0:00:00"
