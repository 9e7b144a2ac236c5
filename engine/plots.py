"""Plots of a training run from its metrics.jsonl: loss.svg and throughput.svg, self-contained SVG files drawn
without a plotting library (none is a dependency).

    from engine.plots import write_plots
    paths = write_plots(output_dir / "metrics.jsonl", output_dir)   # [output_dir/loss.svg, .../throughput.svg]

    python -m engine.plots runs/x/metrics.jsonl [--out DIR] [--log-y]

write_plots(metrics_path, out_dir, log_y=False) -> list[Path] reads the records engine.metrics_log.MetricsLog
writes and always writes both files (atomically, engine.atomic), returning their paths:
- loss.svg: "loss" against "step" in the first panel, then a panel per "losses" component (each on its own
  scale), then, when eval records carry a "metric" (fine-tuning's VQA score or accuracy, named by
  "metric_name"), a panel of it. Train records draw solid lines; eval records draw dashed lines with round
  markers, in the colour of the train series of the same name. log_y=True puts the loss axes on a log scale
  (values <= 0 are then left out).
- throughput.svg: the train records' "samples_per_s"; below it, on the same step axis, "mfu" in percent when
  any train record has a finite one.
Each line is one <path class="series" data-series=NAME data-kind=train|eval> (NAME as in TensorBoard: "loss",
"losses/mlm", "samples_per_s", "mfu"), so the files are easy to check as XML.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable
from xml.sax.saxutils import escape, quoteattr

from engine.atomic import write_text_atomic
from engine.metrics_log import read_metrics

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")  # fmt: skip
WIDTH, PANEL_HEIGHT = 780, 320
LEFT, RIGHT, TOP, BOTTOM = 72, 200, 36, 44  # margins of each panel's plot box; the legend is on the right
LEGEND_ROW = 15


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
    color: str
    points: list[tuple[int, float]]


def _series(name: str, label: str, kind: str, color: str, records: list[dict[str, Any]],
            get: Callable[[dict[str, Any]], Any], scale: float = 1.0) -> Series | None:  # fmt: skip
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
        found = [_series(name, f"{label} ({kind})", kind, color, records, get)
                 for kind, records in (("train", train), ("eval", evals))]  # fmt: skip
        return [s for s in found if s is not None]

    title = "loss (total of the components)" if components else "loss"
    panels = [Panel(title, "loss", series("loss", "loss", COLORS[0], lambda r: r.get("loss")), log_y=log_y)]
    for i, name in enumerate(components, 1):
        get = lambda r, name=name: _losses(r).get(name)  # noqa: E731
        panels.append(Panel(f"{name} loss", name, series(f"losses/{name}", name, COLORS[i % len(COLORS)], get),
                            log_y=log_y))  # fmt: skip
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

    def plottable(self, series: Series) -> list[tuple[int, float] | None]:
        """The points in plot space (log10 for log_y); None where the line breaks."""
        out: list[tuple[int, float] | None] = []
        for step, value in series.points:
            ok = math.isfinite(value) and (value > 0 or not self.log_y)
            out.append((step, math.log10(value) if self.log_y else value) if ok else None)
        return out


def _nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> tuple[list[float], float]:
    """About `count` round ticks (1, 2, 2.5 or 5 times a power of ten apart) within [lo, hi], and their step."""
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    multiples = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * magnitude for m in multiples if m * magnitude >= raw * (1 - 1e-9))
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    n = math.floor((hi - first) / step + 1e-9) + 1
    return [first + i * step + 0.0 for i in range(n)], step  # + 0.0: no "-0" label


def _tick_labels(ticks: list[float], step: float) -> list[str]:
    if not ticks:
        return []
    if max(abs(t) for t in ticks) >= 1e6 or step < 1e-4:
        return [f"{t:.6g}" for t in ticks]
    decimals = next(d for d in range(6) if abs(round(step, d) - step) <= step * 1e-6)
    return [f"{t:.{decimals}f}" for t in ticks]


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Ticks (in log10 space) and labels for a log axis spanning 10**lo .. 10**hi."""
    decades = range(math.floor(lo), math.ceil(hi) + 1)
    for multiples in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        values = [m * 10.0**e for e in decades for m in multiples]
        values = [v for v in values if lo - 1e-9 <= math.log10(v) <= hi + 1e-9]
        if len(values) >= 3:
            values = values[:: math.ceil(len(values) / 10)]
            return [math.log10(v) for v in values], [f"{v:g}" for v in values]
    linear, step = _nice_ticks(10**lo, 10**hi)
    linear = [v for v in linear if v > 0]
    return [math.log10(v) for v in linear], _tick_labels(linear, step)


def _padded(lo: float, hi: float, fraction: float = 0.05) -> tuple[float, float]:
    if hi > lo:
        pad = (hi - lo) * fraction
        return lo - pad, hi + pad
    pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def _svg(panels: list[Panel], title: str) -> str:
    """One SVG document: the panels stacked, sharing the step axis."""
    height = PANEL_HEIGHT * len(panels)
    box_w, box_h = WIDTH - LEFT - RIGHT, PANEL_HEIGHT - TOP - BOTTOM
    steps = [p[0] for panel in panels for s in panel.series for p in panel.plottable(s) if p is not None]
    x_lo, x_hi = (min(steps), max(steps)) if steps else (0, 1)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    x_ticks, x_step = _nice_ticks(x_lo, x_hi, count=6, integer=True)
    x_labels = _tick_labels(x_ticks, x_step)

    def px(step: float) -> float:
        return LEFT + (step - x_lo) / (x_hi - x_lo) * box_w

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}"'
        ' font-family="sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
    ]
    for index, panel in enumerate(panels):
        top = index * PANEL_HEIGHT + TOP
        bottom = top + box_h
        lines = [(s, panel.plottable(s)) for s in panel.series]
        values = [p[1] for _, pts in lines for p in pts if p is not None]
        y_lo, y_hi = _padded(min(values), max(values)) if values else (0.0, 1.0)
        if panel.from_zero and values:
            y_lo, y_hi = min(y_lo, 0.0), max(y_hi, 0.0)
        if panel.log_y:
            y_ticks, y_labels = _log_ticks(y_lo, y_hi)
        else:
            y_ticks, y_step = _nice_ticks(y_lo, y_hi)
            y_labels = _tick_labels(y_ticks, y_step)

        def py(value: float, y_lo: float = y_lo, y_hi: float = y_hi, bottom: float = bottom) -> float:
            return bottom - (value - y_lo) / (y_hi - y_lo) * box_h

        out.append(f"<g class=\"panel\" data-title={quoteattr(panel.title)}>")
        out.append(f'<text x="{LEFT}" y="{top - 12}" font-size="13" font-weight="bold">{escape(panel.title)}</text>')
        out.append(f'<text transform="translate(16 {top + box_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
                   f"{escape(panel.y_label)}{' (log scale)' if panel.log_y else ''}</text>")  # fmt: skip
        for tick, label in zip(y_ticks, y_labels):
            y = py(tick)
            out.append(f'<line x1="{LEFT}" x2="{LEFT + box_w}" y1="{y:.2f}" y2="{y:.2f}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{LEFT - 6}" y="{y + 4:.2f}" text-anchor="end">{escape(label)}</text>')
        for tick, label in zip(x_ticks, x_labels):
            x = px(tick)
            out.append(f'<line x1="{x:.2f}" x2="{x:.2f}" y1="{bottom}" y2="{bottom + 5}" stroke="black"/>')
            out.append(f'<text x="{x:.2f}" y="{bottom + 17}" text-anchor="middle">{escape(label)}</text>')
        out.append(f'<text x="{LEFT + box_w / 2}" y="{bottom + 34}" text-anchor="middle">step</text>')
        out.append(f'<rect x="{LEFT}" y="{top}" width="{box_w}" height="{box_h}" fill="none" stroke="black"/>')
        if not values:
            out.append(f'<text x="{LEFT + box_w / 2}" y="{top + box_h / 2}" text-anchor="middle" fill="#888">'
                       "no data</text>")  # fmt: skip
        legend_x = LEFT + box_w + 14
        for row, (series, points) in enumerate(lines):
            dashed = ' stroke-dasharray="6 4"' if series.kind == "eval" else ""
            width = 2 if series.name == "loss" else 1.4
            commands, pen_down = [], False
            for point in points:
                if point is None:
                    pen_down = False
                    continue
                commands.append(f"{'L' if pen_down else 'M'}{px(point[0]):.2f},{py(point[1]):.2f}")
                pen_down = True
            attributes = f"data-series={quoteattr(series.name)} data-kind={quoteattr(series.kind)}"
            out.append(f'<path class="series" {attributes} d="{" ".join(commands)}" fill="none"'
                       f' stroke="{series.color}" stroke-width="{width}"{dashed}/>')  # fmt: skip
            drawn = [p for p in points if p is not None]
            if series.kind == "eval" or len(drawn) == 1:
                out.append(f'<g class="markers" {attributes} fill="{series.color}">')
                out.extend(f'<circle cx="{px(s):.2f}" cy="{py(v):.2f}" r="3"/>' for s, v in drawn)
                out.append("</g>")
            y = top + 8 + row * LEGEND_ROW
            label = series.label + ("" if drawn else ": no finite values")
            out.append(f'<g class="legend" {attributes}>'
                       f'<line x1="{legend_x}" x2="{legend_x + 22}" y1="{y}" y2="{y}" stroke="{series.color}"'
                       f' stroke-width="{width}"{dashed}/>'
                       f'<text x="{legend_x + 28}" y="{y + 4}">{escape(label)}</text></g>')  # fmt: skip
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_plots(metrics_path: str | Path, out_dir: str | Path, log_y: bool = False) -> list[Path]:
    """Write out_dir/loss.svg and out_dir/throughput.svg from a metrics.jsonl; returns their paths."""
    metrics_path, out_dir = Path(metrics_path), Path(out_dir)
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
    written = []
    for name, panels in (("loss.svg", loss), ("throughput.svg", throughput)):
        path = out_dir / name
        write_text_atomic(path, _svg(panels, f"{run}: {name[:-4]}"))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lxmert-plots",
                                     description="loss.svg and throughput.svg from a run's metrics.jsonl")  # fmt: skip
    parser.add_argument("metrics", type=Path, help="the run's metrics.jsonl")
    parser.add_argument("--out", type=Path, help="directory for the SVG files (default: the metrics file's)")
    parser.add_argument("--log-y", action="store_true", help="loss on a log scale")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        parser.error(f"no such file: {args.metrics}")
    for path in write_plots(args.metrics, args.out or args.metrics.parent, log_y=args.log_y):
        print(path)


if __name__ == "__main__":
    main()
