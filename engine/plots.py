"""Plots of a training run from its metrics.jsonl, drawn with matplotlib (Agg; imported only when drawing):
loss.svg / loss.png and throughput.svg / throughput.png.

    from engine.plots import write_plots
    paths = write_plots(output_dir / "metrics.jsonl", output_dir)   # [loss.svg, loss.png, throughput.svg, ...png]

    python -m engine.plots runs/x/metrics.jsonl [--out DIR] [--log-y]

write_plots(metrics_path, out_dir, log_y=False) -> list[Path] reads the records engine.metrics_log.MetricsLog
writes and always writes the four files (atomically, engine.atomic), returning their paths; figures() gives the
two matplotlib Figures without writing them:
- loss: "loss" against "step" in the first panel, then a panel per "losses" component (each on its own scale),
  then, when eval records carry a "metric" (fine-tuning's VQA score or accuracy, named by "metric_name"), a
  panel of it. Train records draw solid lines; eval records draw dashed lines with round markers, in the colour
  of the train series of the same name. log_y=True puts the loss axes on a log scale (values <= 0 are then left
  out).
- throughput: the train records' "samples_per_s"; below it, on the same step axis, "mfu" in percent when any
  train record has a finite one.
Each line is one Line2D whose gid is "NAME:KIND" (NAME as in TensorBoard: "loss", "losses/mlm", "samples_per_s",
"mfu"; KIND train or eval) and whose data are the steps and values drawn (nan where the line breaks); each panel's
Axes has the gid "panel:TITLE". The SVG carries both gids as element ids.

What the reader accepts (one JSON object per line):
- train records: no "kind", or "kind": "train"; eval records: "kind": "eval"; other kinds are ignored.
- "step" must be an integer; a record without one is skipped with a warning.
- every other field may be missing or null (no point there); numbers may be the strings "nan", "inf", "-inf"
  (MetricsLog's spelling of non-finite floats): no point there either, and the line breaks at that step.
- a resumed run writes {"kind": "resume", "step": k, "checkpoint": ...} first: records after step k are dropped
  (what the killed run logged past its last checkpoint). Without one (older logs), a record whose step is not after
  the previous record of its kind starts over from that step. Earlier records of its kind at that step or
  later, and of the other kind at later steps, are dropped: the last record of each step wins, and steps a
  killed run logged past its last checkpoint do not linger.
- a line that is not a JSON object is skipped with a warning (UserWarning) naming the file and line number,
  not an error: a run killed mid-write leaves half a line, which the resumed run's first line then continues,
  and the plots of a long run are worth more than that one point.
An empty log still gives both files, their panels saying "no data".
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.atomic import write_file_atomic
from engine.metrics_log import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLORS = tuple(f"C{i}" for i in range(10))  # matplotlib's default cycle
PNG_DPI = 100


def _number(value: Any) -> float | None:
    """A record's value as a float (possibly inf or nan: the strings MetricsLog writes), None when not a number."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


@dataclass
class Series:
    """One line: (step, value) points in step order; a non-finite value breaks the line there."""

    name: str  # the TensorBoard tag: "loss", "losses/mlm", "samples_per_s", "mfu"
    label: str
    kind: str  # "train" or "eval"
    color: str  # a matplotlib colour
    points: list[tuple[int, float]]


def _series(
    name: str,
    label: str,
    kind: str,
    color: str,
    records: list[dict[str, Any]],
    get: Callable[[dict[str, Any]], Any],
    scale: float = 1.0,
) -> Series | None:
    """The series of `get(record)` over the records, None when no record has the field at all."""
    points = [(r["step"], value * scale) for r in records if (value := _number(get(r))) is not None]
    return Series(name, label, kind, color, points) if points else None


def _losses(record: dict[str, Any]) -> dict[str, Any]:
    losses = record.get("losses")
    return losses if isinstance(losses, dict) else {}


def _components(records: Iterable[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}  # first-seen order
    for r in records:
        names.update(dict.fromkeys(_losses(r)))
    return list(names)


def _loss_panels(train: list[dict[str, Any]], evals: list[dict[str, Any]], log_y: bool) -> list[Panel]:
    """The total loss, then one panel per component (each on its own scale: the total of LXMERT's six losses is
    many times its smallest), train and eval together."""
    components = _components(train + evals)

    def series(name: str, label: str, color: str, get: Callable[[dict[str, Any]], Any]) -> list[Series]:
        found = [
            _series(name, f"{label} ({kind})", kind, color, records, get)
            for kind, records in (("train", train), ("eval", evals))
        ]
        return [s for s in found if s is not None]

    title = "loss (total of the components)" if components else "loss"
    panels = [Panel(title, "loss", series("loss", "loss", COLORS[0], lambda r: r.get("loss")), log_y=log_y)]
    for i, name in enumerate(components, 1):
        get = lambda r, name=name: _losses(r).get(name)  # noqa: E731
        panels.append(
            Panel(f"{name} loss", name, series(f"losses/{name}", name, COLORS[i % len(COLORS)], get), log_y=log_y)
        )
    return panels


def _metric_panel(evals: list[dict[str, Any]]) -> Panel | None:
    """Fine-tuning's evaluation score (VQA score, accuracy) by step, when the eval records carry one."""
    metric = _series("metric", "eval", "eval", COLORS[1], evals, lambda r: r.get("metric"))
    if metric is None:
        return None
    name = next((r["metric_name"] for r in evals if isinstance(r.get("metric_name"), str)), "metric")
    return Panel(f"evaluation: {name}", name, [metric])


@dataclass
class Panel:
    title: str
    y_label: str
    series: list[Series]
    log_y: bool = False
    from_zero: bool = False  # the y axis includes 0 (throughput: a 5% dip should look like one)


def _draw(panels: list[Panel], title: str) -> Figure:
    """One figure: the panels stacked, sharing the step axis. Each line's gid is "NAME:KIND" ("losses/mlm:eval"),
    each panel's "panel:TITLE"; the SVG writes both as ids."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9.0, 0.4 + 3.0 * len(panels)), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        ax.set_gid(f"panel:{panel.title}")
        ax.set_title(panel.title, loc="left", fontweight="bold")
        ax.set_ylabel(panel.y_label + (" (log scale)" if panel.log_y else ""))
        ax.grid(True, color="#e5e5e5")
        if panel.log_y:
            ax.set_yscale("log")
        for series in panel.series:
            steps = np.array([step for step, _ in series.points], dtype=np.float64)
            values = np.array([value for _, value in series.points], dtype=np.float64)
            drawable = np.isfinite(values) & ((values > 0) if panel.log_y else True)
            values[~drawable] = np.nan  # matplotlib breaks the line at a nan
            label = series.label + ("" if drawable.any() else ": no finite values")
            marked = series.kind == "eval" or drawable.sum() == 1  # a lone point draws no line: mark it
            ax.plot(
                steps,
                values,
                color=series.color,
                label=label,
                gid=f"{series.name}:{series.kind}",
                linestyle="--" if series.kind == "eval" else "-",
                linewidth=2.0 if series.name == "loss" else 1.4,
                marker="o" if marked else None,
                markersize=4,
            )
        if not any(np.isfinite(line.get_ydata()).any() for line in ax.get_lines()):
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#888888")
        if panel.from_zero and ax.get_lines():
            low, high = ax.get_ylim()
            ax.set_ylim(min(low, 0.0), max(high, 0.0))
        if panel.series:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("step")
    return fig


def save_figure(figure: Figure, path: str | Path, dpi: float = PNG_DPI) -> Path:
    """Write a matplotlib figure atomically in the format its suffix names (.svg, .png); the SVG without a date,
    so a rerun on the same data gives the same file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(figure)  # Agg, whatever pyplot's backend: no display, no global state
    fmt = path.suffix.lstrip(".").lower()
    metadata = {"Date": None} if fmt == "svg" else None
    write_file_atomic(path, lambda name: figure.savefig(name, format=fmt, dpi=dpi, metadata=metadata))
    return path


def figures(metrics_path: str | Path, log_y: bool = False) -> dict[str, Figure]:
    """{"loss": Figure, "throughput": Figure} drawn from a metrics.jsonl (what write_plots writes)."""
    metrics_path = Path(metrics_path)
    train, evals = read_metrics(metrics_path)
    run = metrics_path.parent.name or str(metrics_path)
    loss = _loss_panels(train, evals, log_y)
    metric = _metric_panel(evals)
    if metric is not None:
        loss.append(metric)
    samples = _series("samples_per_s", "samples/s (train)", "train", COLORS[0], train, lambda r: r.get("samples_per_s"))
    throughput = [Panel("throughput", "samples/s", [samples] if samples is not None else [], from_zero=True)]
    mfu = _series("mfu", "MFU (train)", "train", COLORS[1], train, lambda r: r.get("mfu"), scale=100.0)
    if mfu is not None and any(math.isfinite(v) for _, v in mfu.points):
        throughput.append(Panel("model FLOPs utilisation", "MFU (%)", [mfu], from_zero=True))
    return {"loss": _draw(loss, f"{run}: loss"), "throughput": _draw(throughput, f"{run}: throughput")}


def write_plots(metrics_path: str | Path, out_dir: str | Path, log_y: bool = False) -> list[Path]:
    """Write loss.svg, loss.png, throughput.svg and throughput.png in out_dir from a metrics.jsonl; returns
    their paths."""
    out_dir, written = Path(out_dir), []
    for name, figure in figures(metrics_path, log_y).items():
        written.append(save_figure(figure, out_dir / f"{name}.svg"))
        figure.set_layout_engine("none")  # the layout is done: the PNG keeps it instead of solving it again
        written.append(save_figure(figure, out_dir / f"{name}.png"))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lxmert-plots", description="loss and throughput plots, SVG and PNG, from a metrics.jsonl"
    )
    parser.add_argument("metrics", type=Path, help="the run's metrics.jsonl")
    parser.add_argument("--out", type=Path, help="directory for the plots (default: the metrics file's)")
    parser.add_argument("--log-y", action="store_true", help="loss on a log scale")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        parser.error(f"no such file: {args.metrics}")
    for path in write_plots(args.metrics, args.out or args.metrics.parent, log_y=args.log_y):
        print(path)


if __name__ == "__main__":
    main()
