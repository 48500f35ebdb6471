"""Charts of `januspipe bench` results, as SVG files.

From the simulated study: throughput relative to 1F1B and bubble fraction against P, one
panel per M = P, 2P, 4P (geometric and arithmetic means over the models). From the real
runs: throughput per schedule and M, and memory per rank (the measured training growth
of each worker's peak RSS beside the replay's estimate). Gantt charts are written by
each run's dump (`--dump-dir`: ``gantt_simulated.svg``, ``gantt_measured.svg``).

Plain SVG written here, like the Gantt charts of passes/wavek.py: a plotting library
would be a dependency for four chart shapes.
"""
from __future__ import annotations

import html
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

COLORS = {
    "1f1b": "#1f77b4", "hanayo": "#ff7f0e", "wavek": "#2ca02c", "gpipe": "#9467bd",
    "wavek@1f1b-mem": "#17becf", "wavek@count-P": "#8c564b",
}
PANEL_W, PANEL_H = 300.0, 220.0
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 58.0, 14.0, 46.0, 44.0
LEGEND_H = 22.0
MAX_COLUMNS = 3

Series = Dict[str, List[Tuple[float, Optional[float]]]]  # name -> (x, y) points


def _color(name: str, i: int) -> str:
    return COLORS.get(name, ["#7f7f7f", "#bcbd22", "#e377c2", "#d62728"][i % 4])


def _nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while not ticks or ticks[-1] < hi - 1e-9 * step:  # the last tick at or above hi
        ticks.append(round(t, 10))
        t += step
    return ticks


def _layout(n_panels: int, title: str, names: Sequence[str], columns: int = MAX_COLUMNS) -> Tuple[float, float, int, float]:
    """Width, height, columns of a grid of panels (at most ``columns`` a row) and the
    legend's top."""
    cols = max(1, min(n_panels, columns))
    rows = max(1, math.ceil(n_panels / cols))
    width = max(MARGIN_L + cols * (PANEL_W + MARGIN_R) + 10, 7.0 * len(title) + 40)
    legend_top = MARGIN_T + rows * (PANEL_H + MARGIN_B + MARGIN_T) - MARGIN_T
    height = legend_top + LEGEND_H * len(_legend_rows(names, width)) + 6
    return width, height, cols, legend_top


def _origin(p: int, cols: int) -> Tuple[float, float]:
    """Top-left corner of panel ``p``'s plotting area."""
    return MARGIN_L + (p % cols) * (PANEL_W + MARGIN_R), MARGIN_T + (p // cols) * (PANEL_H + MARGIN_B + MARGIN_T)


def _text(x: float, y: float, s: str, anchor: str = "middle", size: int = 11, extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {extra}>{html.escape(s)}</text>'


def _legend_rows(names: Sequence[str], width: float) -> List[List[str]]:
    """The legend's entries, wrapped into rows that fit ``width``."""
    rows: List[List[str]] = [[]]
    x = MARGIN_L
    for name in names:
        w = 28 + 7.5 * len(name)
        if rows[-1] and x + w > width - 10:
            rows.append([])
            x = MARGIN_L
        rows[-1].append(name)
        x += w
    return rows


def _legend(names: Sequence[str], width: float, top: float) -> List[str]:
    """Every entry, in as many rows as it takes, from ``top`` down."""
    out = []
    for r, row in enumerate(_legend_rows(names, width)):
        x, y = MARGIN_L, top + 14 + r * LEGEND_H
        for name in row:
            out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="12" height="10" fill="{_color(name, names.index(name))}"/>')
            out.append(_text(x + 16, y, name, anchor="start"))
            x += 28 + 7.5 * len(name)
    return out


def _chart_start(width: float, height: float, title: str) -> List[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" font-family="sans-serif">',
        '<rect width="100%" height="100%" fill="white"/>',
        _text(width / 2, 18, title, size=13, extra='font-weight="bold"'),
    ]


def _panel_box(x0: float, y0: float, title: str, ticks: Sequence[float], tick_y: Any, labels: bool) -> List[str]:
    """A panel's frame, title and horizontal grid lines (tick labels on the first column)."""
    out = [
        f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{PANEL_W:.1f}" height="{PANEL_H:.1f}" fill="none" stroke="#999"/>',
        _text(x0 + PANEL_W / 2, y0 - 8, title),
    ]
    for t in ticks:
        out.append(f'<line x1="{x0:.1f}" x2="{x0 + PANEL_W:.1f}" y1="{tick_y(t):.1f}" y2="{tick_y(t):.1f}" stroke="#eee"/>')
        if labels:
            out.append(_text(x0 - 6, tick_y(t) + 4, f"{t:g}", anchor="end", size=10))
    return out


def _chart_end(ylabel: str, names: Sequence[str], width: float, legend_top: float) -> str:
    mid = MARGIN_T + PANEL_H / 2
    return "\n".join([_text(16, mid, ylabel, extra=f'transform="rotate(-90 16 {mid:.1f})"'), *_legend(names, width, legend_top), "</svg>"]) + "\n"


def line_panels(panels: Sequence[Tuple[str, Series]], title: str, xlabel: str, ylabel: str, reference: Optional[float] = None) -> str:
    """Small multiples of line charts sharing one y range, x on a log2 scale (P): one panel
    per (title, series); ``reference`` draws a dashed line at that y."""
    names = list(dict.fromkeys(n for _, ser in panels for n in ser))
    ys = [y for _, ser in panels for pts in ser.values() for _, y in pts if y is not None and math.isfinite(y)]
    if reference is not None:
        ys.append(reference)
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = 0.06 * (hi - lo or abs(hi) or 1.0)
    ticks = _nice_ticks(lo - pad, hi + pad)
    lo, hi = ticks[0], ticks[-1]
    width, height, cols, legend_top = _layout(len(panels), title, names)
    out = _chart_start(width, height, title)
    for p, (ptitle, ser) in enumerate(panels):
        x0, y0 = _origin(p, cols)
        y1 = y0 + PANEL_H
        xs = sorted({x for pts in ser.values() for x, _ in pts})
        xlo, xhi = (math.log2(xs[0]), math.log2(xs[-1])) if xs else (0.0, 1.0)
        span = (xhi - xlo) or 1.0

        def px(v: float) -> float:
            return x0 + 12 + (math.log2(v) - xlo) / span * (PANEL_W - 24)

        def py(v: float) -> float:
            return y1 - (v - lo) / (hi - lo) * PANEL_H

        out += _panel_box(x0, y0, ptitle, ticks, py, p % cols == 0)
        if reference is not None:
            out.append(f'<line x1="{x0:.1f}" x2="{x0 + PANEL_W:.1f}" y1="{py(reference):.1f}" y2="{py(reference):.1f}" stroke="#555" stroke-dasharray="4 3"/>')
        for v in xs:
            out.append(_text(px(v), y1 + 16, f"{v:g}", size=10))
        out.append(_text(x0 + PANEL_W / 2, y1 + 34, xlabel))
        for i, name in enumerate(names):
            pts = [(x, y) for x, y in ser.get(name, []) if y is not None and math.isfinite(y)]
            if not pts:
                continue
            color = _color(name, i)
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"><title>{html.escape(name)}</title></polyline>')
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"><title>{html.escape(name)}: {y:.6g}</title></circle>' for x, y in pts]
    return "\n".join(out) + "\n" + _chart_end(ylabel, names, width, legend_top)


def bar_panels(
    panels: Sequence[Tuple[str, List[str], Dict[str, List[Optional[float]]]]], title: str, ylabel: str, columns: int = MAX_COLUMNS
) -> str:
    """Grouped bars, one panel per (title, group labels, name -> one value per group)."""
    names = list(dict.fromkeys(n for _, _, ser in panels for n in ser))
    ys = [y for _, _, ser in panels for vals in ser.values() for y in vals if y is not None and math.isfinite(y)]
    ticks = _nice_ticks(0.0, max(ys) * 1.05 if ys else 1.0)
    hi = ticks[-1]
    width, height, cols, legend_top = _layout(len(panels), title, names, columns)
    out = _chart_start(width, height, title)
    for p, (ptitle, groups, ser) in enumerate(panels):
        x0, y0 = _origin(p, cols)
        y1 = y0 + PANEL_H
        out += _panel_box(x0, y0, ptitle, ticks, lambda t: y1 - t / hi * PANEL_H, p % cols == 0)
        present = [n for n in names if n in ser]
        gw = PANEL_W / max(len(groups), 1)
        bw = 0.8 * gw / max(len(present), 1)
        for g, label in enumerate(groups):
            gx = x0 + g * gw + 0.1 * gw
            out.append(_text(x0 + (g + 0.5) * gw, y1 + 16, label, size=10))
            for j, name in enumerate(present):
                v = ser[name][g] if g < len(ser[name]) else None
                if v is None or not math.isfinite(v):
                    continue
                h = v / hi * PANEL_H
                out.append(
                    f'<rect x="{gx + j * bw:.1f}" y="{y1 - h:.1f}" width="{bw * 0.92:.1f}" height="{h:.1f}" fill="{_color(name, names.index(name))}">'
                    f"<title>{html.escape(name)} {html.escape(label)}: {v:.6g}</title></rect>"
                )
    return "\n".join(out) + "\n" + _chart_end(ylabel, names, width, legend_top)


BOUND = "bound"
"""Series name of the efficiency bound (`passes.wavek.makespan_lower_bound`) in the charts."""


def simulated_charts(sim: Mapping[str, Any]) -> Dict[str, str]:
    """File name -> SVG: throughput relative to 1F1B, bubble fraction, and WaveK's
    efficiency beside its bound, against P."""
    from .bench import _gmean, _mean

    rows = sim.get("rows", [])
    odd = [r for r in rows if r["microbatches"] % r["stages"]]
    if odd:
        log.warning("%d simulated row(s) with M not a multiple of P left out of the charts", len(odd))
        rows = [r for r in rows if not r["microbatches"] % r["stages"]]
    factors = sorted({r["microbatches"] // r["stages"] for r in rows})
    schedules = list(dict.fromkeys(s for r in rows for s in r["schedules"]))
    models = sorted({r["model"] for r in rows})
    speed, bubble, efficiency = [], [], []
    for f in factors:
        sel = [r for r in rows if r["microbatches"] == f * r["stages"]]
        stages = sorted({r["stages"] for r in sel})
        sp: Series = {s: [] for s in schedules}
        bu: Series = {s: [] for s in schedules}
        ef: Series = {"wavek": [], BOUND: []}
        for P in stages:
            at = [r for r in sel if r["stages"] == P]
            ef["wavek"].append((P, _mean([r.get("wavek_efficiency") for r in at])))
            ef[BOUND].append((P, _mean([r.get("wavek_efficiency_bound") for r in at])))
            for s in schedules:
                thr = [r["structures_per_s"] for r in at]
                sp[s].append((P, _gmean([t[s] / t["1f1b"] for t in thr if t.get(s) and t.get("1f1b")])))
                bu[s].append((P, _mean([r["schedules"][s]["bubble_fraction"] for r in at if s in r["schedules"]])))
        label = "M = P" if f == 1 else f"M = {f}P"
        speed.append((label, sp))
        bubble.append((label, bu))
        efficiency.append((label, {k: v for k, v in ef.items() if any(y is not None for _, y in v)}))
    where = sim.get("costs", {})
    costs = "this machine's costs" if where.get("timed") == "here" or not where else f"costs timed on {where.get('device_name', where.get('device'))}"
    over = f"{', '.join(models)}; {costs}"
    return {
        "sim_throughput_vs_p.svg": line_panels(
            speed, f"Simulated throughput relative to 1F1B (geometric mean over {over})", "P (stages)", "throughput / 1F1B's",
            reference=1.0,
        ),
        "sim_bubble_vs_p.svg": line_panels(bubble, f"Simulated bubble fraction (mean over {over})", "P (stages)", "bubble fraction"),
        "sim_efficiency_vs_p.svg": line_panels(
            efficiency, f"WaveK's simulated efficiency and its bound (mean over {over})",
            "P (stages)", "ideal / makespan",
        ),
    }


def real_charts(entries: Sequence[Mapping[str, Any]]) -> Dict[str, str]:
    """File name -> SVG: structures/s per schedule and M, and memory per rank per M."""
    if not entries:
        return {}
    P = entries[0]["stages"]
    schedules = list(dict.fromkeys(s for e in entries for s in e["schedules"]))
    groups = [f"M = {e['microbatches']}" for e in entries]
    thr = {s: [e["schedules"].get(s, {}).get("structures_per_s") for e in entries] for s in schedules}
    out = {f"real_p{P}_throughput.svg": bar_panels([(f"P = {P}, median step", groups, thr)], f"Measured throughput, P = {P}", "structures / s")}
    panels = []
    for e in entries:
        ranks = [f"rank {r}" for r in range(e["stages"])]
        measured = {s: v.get("measured_rss_growth_mb") for s, v in e["schedules"].items()}
        if all(m is not None for m in measured.values()):
            panels.append((f"M = {e['microbatches']}, measured", ranks, {s: list(m) for s, m in measured.items()}))
        panels.append((f"M = {e['microbatches']}, replayed estimate", ranks, {s: list(v["est_peak_growth_mb"]) for s, v in e["schedules"].items()}))
    columns = 2 if any(t.endswith("measured") for t, _, _ in panels) else MAX_COLUMNS  # measured beside estimate
    out[f"real_p{P}_memory_per_rank.svg"] = bar_panels(
        panels, f"Peak memory growth per rank during training, P = {P} (MB; measured: peak RSS growth)", "MB", columns
    )
    return out


def merge_results(results: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """One result from several bench JSON files (say, one invocation per M): real entries
    pooled and sorted by (P, M), a later file's entry replacing an earlier one's for the
    same (P, M); simulated rows pooled the same way by (model, P, M). The simulated
    metadata (costs, links) is the first file's: pool only runs of one setting."""
    real: Dict[Tuple[int, int], Any] = {}
    rows: Dict[Tuple[str, int, int], Any] = {}
    sim_meta: Optional[Mapping[str, Any]] = None
    for r in results:
        for e in r.get("real", []):
            real[(e["stages"], e["microbatches"])] = e
        if r.get("simulated", {}).get("rows"):
            sim_meta = sim_meta or r["simulated"]
            for row in r["simulated"]["rows"]:
                rows[(row["model"], row["stages"], row["microbatches"])] = row
    out: Dict[str, Any] = {}
    if real:
        out["real"] = [real[k] for k in sorted(real)]
    if rows:
        out["simulated"] = {**sim_meta, "rows": [rows[k] for k in sorted(rows)]}
    return out


def write_bench_plots(result: Mapping[str, Any], out_dir: str) -> List[str]:
    """Write every chart the result has data for into ``out_dir``; return the paths."""
    charts: Dict[str, str] = {}
    if result.get("simulated", {}).get("rows"):
        charts.update(simulated_charts(result["simulated"]))
    for P in sorted({e["stages"] for e in result.get("real", [])}):
        charts.update(real_charts([e for e in result["real"] if e["stages"] == P]))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, svg in charts.items():
        path = os.path.join(out_dir, name)
        with open(path, "w") as f:
            f.write(svg)
        paths.append(path)
    log.info("wrote %d chart(s) to %s", len(paths), out_dir)
    return paths


def add_plot_args(p: Any) -> None:
    p.add_argument("results", nargs="+", help="JSON files written by `januspipe bench --out` (pooled: e.g. one per M)")
    p.add_argument("--out", required=True, help="directory for the SVG charts")


def main(args: Any) -> int:
    """`januspipe plot`: charts of one or more bench results."""
    import json

    results = []
    for path in args.results:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"januspipe plot: cannot read {path}: {exc}; give the JSON files `januspipe bench --out` wrote")
        if not isinstance(result, dict) or not ({"real", "simulated"} & set(result)):
            raise SystemExit(f"januspipe plot: {path} is not a `januspipe bench --out` result (no 'real' or 'simulated' runs)")
        if result.get("partial"):
            log.warning("%s is a partial result (the bench stopped before its last M): plotting the M's it finished", path)
        results.append(result)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"januspipe plot: --out {args.out} is a file; give a directory for the charts")
    try:
        merged = merge_results(results)
        if not merged:
            raise SystemExit("januspipe plot: no real or simulated runs in " + ", ".join(args.results) + "; nothing to plot")
        paths = write_bench_plots(merged, args.out)
    except (KeyError, TypeError) as exc:
        raise SystemExit(f"januspipe plot: a result lacks a field the charts need ({exc!r}); was it written by another version of januspipe bench?")
    for path in paths:
        print(f"wrote {path}")
    return 0
