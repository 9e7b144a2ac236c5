"""engine/metrics_log.py and engine/plots.py: TensorBoard scalars (a fake writer; real event files when the
tensorboard package is installed), the progress bar, and the plots: the arrays each matplotlib line was given (one
line per series, found by its gid), resumed logs de-duplicated, and the ids the SVG carries. W&B and a tracker
that is missing: tests/test_trackers.py."""

from __future__ import annotations

import io
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from engine import metrics_log
from engine.metrics_log import MetricsLog, tracker_scalars
from engine.plots import PNG_DPI, figures, main, read_metrics, write_plots


def train_record(step: int, loss: float, **fields) -> dict:
    record = {
        "step": step,
        "total_steps": 100,
        "loss": loss,
        "losses": {"mlm": 0.6 * loss, "obj": 0.4 * loss},
        "lr": 1e-4,
        "grad_norm": 1.5,
        "samples_per_s": 100.0 + step,
        "mfu": 0.3,
        "skipped": False,
    }
    return {**record, **fields}


def write_jsonl(path: Path, records: list, extra_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for index, line in sorted((extra_lines or {}).items()):
        lines.insert(index, line)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def drawn(figure) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    """{(series, kind): (steps, values)}: the arrays matplotlib was given for each line (its gid "NAME:KIND");
    asserts one line per series."""
    out: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for ax in figure.axes:
        for line in ax.get_lines():
            name, kind = line.get_gid().rsplit(":", 1)
            assert (name, kind) not in out, f"two lines for {name, kind}"
            out[name, kind] = ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
    return out


def same(got: list[float], expected: list[float]) -> bool:
    """Equal, a nan (where a line breaks) matching a nan."""
    return len(got) == len(expected) and all(g == e or (math.isnan(g) and math.isnan(e)) for g, e in zip(got, expected))


def panels(figure) -> dict[str, object]:
    """{title: Axes}, in drawing order, from each panel's gid "panel:TITLE"."""
    return {ax.get_gid().removeprefix("panel:"): ax for ax in figure.axes}


def legend_labels(figure) -> set[str]:
    return {t.get_text() for ax in figure.axes if ax.get_legend() for t in ax.get_legend().get_texts()}


def svg_ids(path: Path) -> set[str]:
    return {e.get("id") for e in ET.parse(path).getroot().iter() if e.get("id")}


# ---- plots ------------------------------------------------------------------------------------------------


def test_loss_plot_has_one_line_per_series_drawn_from_the_data(tmp_path):
    losses = [9.0, 7.5, 8.0, 4.0, 3.5, 3.5, 2.0]
    steps = [10 * (i + 1) for i in range(len(losses))]
    evals = [
        {"kind": "eval", "step": 30, "loss": 7.0, "losses": {"mlm": 4.0}, "accuracy": 0.4},
        {"kind": "eval", "step": 70, "loss": 2.5, "losses": {"mlm": 1.5}, "accuracy": 0.6},
    ]
    records = [train_record(s, v) for s, v in zip(steps, losses)]
    metrics = write_jsonl(tmp_path / "metrics.jsonl", records[:3] + evals[:1] + records[3:] + evals[1:])
    written = write_plots(metrics, tmp_path / "plots")
    names = ("loss.svg", "loss.png", "throughput.svg", "throughput.png")
    assert written == [tmp_path / "plots" / name for name in names]
    figure = figures(metrics)["loss"]
    series = drawn(figure)
    assert set(series) == {
        ("loss", "train"),
        ("losses/mlm", "train"),
        ("losses/obj", "train"),
        ("loss", "eval"),
        ("losses/mlm", "eval"),
    }
    assert series["loss", "train"] == (steps, losses)
    assert series["losses/mlm", "train"] == (steps, [0.6 * v for v in losses])
    assert series["loss", "eval"] == ([30, 70], [7.0, 2.5]) and series["losses/mlm", "eval"] == ([30, 70], [4.0, 1.5])
    assert {"loss (train)", "mlm (train)", "obj (train)", "loss (eval)", "mlm (eval)"} <= legend_labels(figure)
    axes = list(panels(figure).values())
    assert axes[-1].get_xlabel() == "step" and all(axes[0].get_shared_x_axes().joined(axes[0], ax) for ax in axes)
    lines = {line.get_gid(): line for ax in axes for line in ax.get_lines()}
    assert lines["loss:eval"].get_linestyle() == "--" and lines["loss:eval"].get_marker() == "o"  # eval: dashed, marked
    assert lines["loss:train"].get_linestyle() == "-" and lines["loss:train"].get_marker() in (None, "None", "")
    assert lines["loss:eval"].get_color() == lines["loss:train"].get_color()
    # what the files carry: every line and panel by id in the SVG, a PNG of the figure's size
    assert {"loss:train", "loss:eval", "losses/mlm:eval", "panel:mlm loss"} <= svg_ids(tmp_path / "plots/loss.svg")
    png = (tmp_path / "plots/loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and png_size(png) == tuple(round(v * PNG_DPI) for v in figure.get_size_inches())


def png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # IHDR's width, height


def test_log_y_draws_on_a_log_scale_without_the_values_it_cannot_show(tmp_path):
    steps, losses = [1, 2, 3, 4], [100.0, 10.0, 1.0, 0.0]
    metrics = write_jsonl(tmp_path / "metrics.jsonl", [train_record(s, v) for s, v in zip(steps, losses)])
    write_plots(metrics, tmp_path, log_y=True)
    figure = figures(metrics, log_y=True)["loss"]
    assert same(drawn(figure)["loss", "train"][1], [100.0, 10.0, 1.0, math.nan])  # 0: no point on a log axis
    for ax in figure.axes:
        assert ax.get_yscale() == "log" and ax.get_ylabel().endswith("(log scale)")
    assert all(ax.get_yscale() == "linear" for ax in figures(metrics)["loss"].axes)


def test_throughput_plot_samples_and_mfu(tmp_path):
    records = [
        train_record(s, 1.0, samples_per_s=v, mfu=m) for s, v, m in [(1, 50.0, 0.2), (2, 80.0, 0.25), (3, 70.0, 0.5)]
    ]
    figure = figures(write_jsonl(tmp_path / "metrics.jsonl", records))["throughput"]
    series = drawn(figure)
    assert set(series) == {("samples_per_s", "train"), ("mfu", "train")}
    assert series["samples_per_s", "train"] == ([1, 2, 3], [50.0, 80.0, 70.0])
    assert series["mfu", "train"] == ([1, 2, 3], [20.0, 25.0, 50.0])  # percent
    assert list(panels(figure)) == ["throughput", "model FLOPs utilisation"]
    assert all(ax.get_ylim()[0] == 0.0 for ax in figure.axes)  # from zero: a 5% dip looks like one
    # the CPU logs "mfu": null: no MFU panel
    records = [train_record(s, 1.0, mfu=None) for s in (1, 2)]
    assert set(drawn(figures(write_jsonl(tmp_path / "metrics.jsonl", records))["throughput"])) == {
        ("samples_per_s", "train")
    }


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
    series = drawn(figures(metrics)["loss"])
    assert series["loss", "train"] == (list(range(1, 8)), [9.0, 8.0, 7.0, 26.0, 25.0, 24.0, 23.0])
    assert series["loss", "eval"] == ([6], [2.0])


def test_non_finite_and_missing_values(tmp_path):
    """MetricsLog writes nan/inf as strings; plots draw those as nan, which breaks the line there; null or
    missing fields just have no point."""
    log = MetricsLog(tmp_path)
    values = [5.0, float("nan"), 4.0, float("inf"), 3.0, None, 2.0]
    for step, value in enumerate(values, 1):
        log.write(
            {
                "step": step,
                "loss": torch.tensor(value) if value is not None else None,
                "losses": {"mlm": 1.0, "obj": float("nan")},
            }
        )
    log.write({"step": 8})  # no loss at all
    log.close()
    assert '"loss": "nan"' in (tmp_path / "metrics.jsonl").read_text()
    write_plots(tmp_path / "metrics.jsonl", tmp_path)
    figure = figures(tmp_path / "metrics.jsonl")["loss"]
    steps, drawn_values = drawn(figure)["loss", "train"]
    assert steps == [1, 2, 3, 4, 5, 7] and same(drawn_values, [5.0, math.nan, 4.0, math.nan, 3.0, 2.0])
    assert all(math.isnan(v) for v in drawn(figure)["losses/obj", "train"][1])  # all nan: nothing drawn ...
    assert "obj (train): no finite values" in legend_labels(figure)  # ... and the legend says why


def test_empty_and_single_record_logs(tmp_path):
    metrics = write_jsonl(tmp_path / "metrics.jsonl", [])
    assert all(path.is_file() for path in write_plots(metrics, tmp_path))
    for figure in figures(metrics).values():
        assert drawn(figure) == {}
        assert all("no data" in [t.get_text() for t in ax.texts] for ax in figure.axes)
    metrics = write_jsonl(tmp_path / "metrics.jsonl", [train_record(5, 2.0)])
    write_plots(metrics, tmp_path)
    for figure in figures(metrics).values():
        for ax in figure.axes:
            for line in ax.get_lines():
                assert list(line.get_xdata()) == [5] and line.get_marker() == "o"  # a lone point is marked


def test_malformed_lines_are_skipped_with_a_warning_naming_them(tmp_path):
    records = [train_record(s, 5.0 - s) for s in (1, 2, 3)]
    metrics = write_jsonl(
        tmp_path / "metrics.jsonl", records, extra_lines={1: '{"step": 2, "loss"', 3: "[1, 2]", 4: '{"loss": 1.0}'}
    )
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
    names = ("loss.svg", "loss.png", "throughput.svg", "throughput.png")
    assert capsys.readouterr().out.split() == [str(run / name) for name in names]
    main([str(metrics), "--out", str(tmp_path / "elsewhere"), "--log-y"])
    assert all((tmp_path / "elsewhere" / name).is_file() for name in names)
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
    log = MetricsLog(tmp_path, report_to=["tensorboard"])
    log.write({"kind": "resume", "step": 9, "checkpoint": "checkpoints/step_00000009"})  # metrics.jsonl only
    log.write(
        {
            "step": 10,
            "total_steps": 20,
            "epoch": 0.5,
            "loss": torch.tensor(3.0),
            "losses": {"mlm": 2.0, "obj": float("nan")},
            "lr": 1e-3,
            "grad_norm": float("inf"),
            "loss_scale": None,
            "skipped": False,
            "skipped_steps": 1,
            "samples_per_s": 812.5,
            "tokens_per_s": 45000.0,
            "tflops": 1.25,
            "mfu": None,
            "data_wait_share": 0.03,
            "peak_memory_gib": 1.5,
            "note": "text",
        }
    )
    log.write({"kind": "eval", "step": 20, "loss": 2.5, "losses": {"mlm": 1.5}, "accuracy": 0.61})
    log.write({"kind": "train", "step": 20, "loss": 2.0})
    log.write({"kind": "stop", "step": 20, "reason": "SIGTERM", "status": 75})  # metrics.jsonl only
    log.close()
    (writer,) = fake_writer.instances
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    assert writer.scalars == [
        ("epoch", 0.5, 10),
        ("loss", 3.0, 10),
        ("losses/mlm", 2.0, 10),
        ("lr", 1e-3, 10),
        ("skipped_steps", 1.0, 10),
        ("samples_per_s", 812.5, 10),
        ("tokens_per_s", 45000.0, 10),
        ("tflops", 1.25, 10),
        ("data_wait_share", 0.03, 10),
        ("peak_memory_gib", 1.5, 10),
        ("eval/loss", 2.5, 20),
        ("eval/losses/mlm", 1.5, 20),
        ("eval/accuracy", 0.61, 20),
        ("loss", 2.0, 20),
    ]
    assert tracker_scalars({"kind": "eval", "step": 3, "metric": 0.7}) == {"eval/metric": 0.7}


def test_tensorboard_off(tmp_path, fake_writer):
    MetricsLog(tmp_path).close()  # trackers only on request (train.report_to)
    MetricsLog(tmp_path, report_to=["none"]).close()
    MetricsLog(tmp_path, enabled=False, report_to=["tensorboard"]).close()  # other ranks write nothing
    assert fake_writer.instances == []


def test_real_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, report_to=["tensorboard"])
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
    log = MetricsLog(tmp_path, progress_total=10, progress_initial=2)
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
    log = MetricsLog(tmp_path, progress_total=10)
    log.advance(1, samples_per_s=10.0)
    log.write(train_record(1, 1.0))
    log.console("step 1 | loss 1.0")
    log.close()
    assert pipe.getvalue() == "" and capsys.readouterr().out == "step 1 | loss 1.0\n"


def test_loss_plot_has_a_panel_per_component_and_the_fine_tuning_score(tmp_path):
    """The total of six losses is many times the smallest: each component gets its own panel (and scale); a
    fine-tuning log's evaluation score gets one too."""
    records = [train_record(s, 10.0 / s) for s in (1, 2, 3)]
    evals = [
        {"kind": "eval", "step": 3, "epoch": 1, "metric": 0.25, "metric_name": "vqa_score"},
        {"kind": "eval", "step": 6, "epoch": 2, "metric": 0.5, "metric_name": "vqa_score"},
    ]
    figure = figures(write_jsonl(tmp_path / "metrics.jsonl", records + evals))["loss"]
    by_title = panels(figure)
    assert list(by_title) == ["loss (total of the components)", "mlm loss", "obj loss", "evaluation: vqa_score"]
    in_panel = {title: {line.get_gid() for line in ax.get_lines()} for title, ax in by_title.items()}
    assert in_panel["mlm loss"] == {"losses/mlm:train"} and in_panel["evaluation: vqa_score"] == {"metric:eval"}
    # each panel on its own scale: the component's range is not squeezed into the total's
    obj = [0.4 * 10.0 / s for s in (1, 2, 3)]
    low, high = by_title["obj loss"].get_ylim()
    assert low <= min(obj) and max(obj) <= high and high - low < 1.2 * (max(obj) - min(obj))
    assert drawn(figure)["metric", "eval"] == ([3, 6], [0.25, 0.5])


def test_console_line_shows_a_zero_lr_as_zero_and_the_time_left():
    from engine.metrics_log import console_line, format_duration

    line = console_line({**train_record(10, 1.0), "lr": -0.0, "eta_s": 3725.4, "peak_memory_gib": 1.0})
    assert "lr 0.00e+00" in line and "eta 1:02:05" in line
    assert "TFLOP/s" not in console_line(
        {
            "step": 1,
            "total_steps": 2,
            "loss": 1.0,
            "lr": 1e-4,
            "grad_norm": 1.0,
            "samples_per_s": 5.0,
            "peak_memory_gib": 0.1,
        }
    )  # fields a record lacks
    assert format_duration(90061) == "1 d 1:01:01" and format_duration(0.4) == "0:00:00"


# ---- records and the console --------------------------------------------------------------------------------


def test_a_train_record_is_written_as_the_log_line_and_read_back(tmp_path):
    """engine/records.py: to_json is metrics.jsonl's line (keys in order, "losses" only when there are any; a
    non-finite float written by its name), and from_json reads that line back."""
    from engine.records import EvalRecord, TrainRecord

    fields = dict(step=3, total_steps=9, epoch=0.5, loss=2.0, losses={"mlm": 1.5, "obj": 0.5}, lr=1e-4)
    fields |= dict(grad_norm=math.inf, loss_scale=None, skipped=True, skipped_steps=1, samples_per_s=10.0)
    fields |= dict(tokens_per_s=90.0, tflops=0.01, mfu=None, data_wait_share=0.1, peak_memory_gib=0.5, threads=1)
    record = TrainRecord(**fields, step_time_s=0.2, eta_s=1.2)
    line = record.to_json()
    assert list(line) == ["kind", *fields, "step_time_s", "eta_s"] and line["kind"] == "train"
    assert "losses" not in TrainRecord(**{**fields, "losses": {}}, step_time_s=0.2, eta_s=1.2).to_json()
    log = MetricsLog(tmp_path)
    log.write(line)
    log.write({"kind": "eval", "step": 3, "loss": 1.0, "losses": {"mlm": 1.0}, "qa_accuracy": None})
    log.close()
    (train,), (evaluation,) = read_metrics(tmp_path / "metrics.jsonl")
    assert train["grad_norm"] == "inf" and TrainRecord.from_json(train) == record
    assert EvalRecord.from_json(evaluation) == EvalRecord(3, {"loss": 1.0, "losses": {"mlm": 1.0}, "qa_accuracy": None})
    assert EvalRecord.from_json(evaluation).to_json() == evaluation


def test_console_logging_writes_plain_lines_to_the_stdout_of_the_moment(capsys):
    """engine/logs.py: the message alone on whatever sys.stdout is when it is logged; rank 0 at INFO, the other
    ranks at WARNING."""
    import logging

    from engine.logs import configure_logging

    logger = logging.getLogger("engine.train")
    try:
        configure_logging(rank=1)
        logger.info("not on rank 1")
        logger.warning("a problem on rank 1")
        configure_logging(rank=0)
        logger.info("step 1/2 | loss 3.0000 | 100% done")
    finally:
        configure_logging(rank=0)  # as tests/conftest.py set it
    assert capsys.readouterr().out == "a problem on rank 1\nstep 1/2 | loss 3.0000 | 100% done\n"
