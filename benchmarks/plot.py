"""The bench's picture: designs against each other and the limits; fleet, slow engine, nodes.

Blocking (matplotlib, file I/O); call it outside an event loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .runner import DESIGNS, FLEET, NODES, SLOW, BenchResult
from .summary import limits, rows_of, summarize

__all__ = ["plot"]

Row = dict[str, Any]


def plot(result: BenchResult, path: Path) -> None:
    """Two rows of panels (PNG): the designs section above, fleet, slow engine and nodes below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summarize(result) if not r["error"]]
    fig, axes = plt.subplots(2, 4, figsize=(22, 9), layout="tight")
    designs = rows_of(rows, DESIGNS)
    _bars(axes[0][0], designs, "stall_ms", "trainer stall per step (ms, log)", "{:.0f}", log=True)
    _bars(axes[0][1], designs, "sync_gbps", "session throughput (GB/s)", "{:.2f}")
    _bars(axes[0][2], designs, "build_frac", "build / one copy", "{:.0%}")
    axes[0][2].axhline(0.6, color="red", linestyle=":", linewidth=1, label="target 60% (load)")
    axes[0][2].axhline(0.8, color="orange", linestyle=":", linewidth=1, label="target 80% (quiet)")
    axes[0][2].axhline(1.0, color="gray", linestyle="--", linewidth=1, label="one copy")
    _bars(axes[0][3], designs, "session_frac", "session / same-node limit", "{:.0%}")
    axes[0][3].axhline(1.0, color="gray", linestyle="--", linewidth=1, label="limit")
    fleet = rows_of(rows, FLEET)
    _fleet(axes[1][0], fleet, "session_s", "fleet: session time (s) vs engines")
    if fleet:
        lim = limits(result, fleet[0]["model_bytes"])
        counts = sorted({r["engines"] for r in fleet})
        axes[1][0].plot(
            counts, [lim.session_s(n) for n in counts], "k--", linewidth=1, label="same-node limit"
        )
    _fleet(axes[1][1], fleet, "stall_ms", "fleet: trainer stall per step (ms) vs engines")
    if fleet:
        copy_ms = limits(result, fleet[0]["model_bytes"]).copy_s * 1e3
        axes[1][1].axhline(
            1.3 * copy_ms, color="red", linestyle=":", linewidth=1, label="1.3x copy"
        )
    _slow(axes[1][2], rows_of(rows, SLOW), {(r["policy"], r["engines"]): r for r in fleet})
    _nodes(axes[1][3], rows_of(rows, NODES))
    for row in axes:
        for ax in row:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    m = result.machine
    load = "/".join(f"{v:.1f}" for v in m["load_average"])
    psi = m.get("cpu_pressure_some_avg60")
    fig.suptitle(
        f"asyncsync bench: {m['cpu_model']}, {m['logical_cores']} cores, load {load}"
        f"{'' if psi is None else f', CPU pressure {psi:.0f}%'}; medians of "
        f"{result.config.steps} steps after {result.config.warmup} warm-up",
        fontsize=10,
    )
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _bars(ax: Any, rows: list[Row], key: str, title: str, fmt: str, log: bool = False) -> None:
    """One group of bars per configuration, one bar per design."""
    configs = list(dict.fromkeys(r["config"] for r in rows))
    designs = list(dict.fromkeys(r["design"] for r in rows))
    by_key = {(r["config"], r["design"]): r for r in rows}
    width = 0.8 / max(1, len(designs))
    for i, design in enumerate(designs):
        xs, ys = [], []
        for j, config in enumerate(configs):
            row = by_key.get((config, design))
            if row is not None and _finite(row[key]):
                xs.append(j + (i - (len(designs) - 1) / 2) * width)
                ys.append(row[key])
        if xs:
            bars = ax.bar(xs, ys, width, label=design)
            ax.bar_label(bars, labels=[fmt.format(y) for y in ys], fontsize=6)
    ax.set_xticks(range(len(configs)), configs, fontsize=7)
    ax.set_title(title, fontsize=9)
    if log:
        ax.set_yscale("log")


def _fleet(ax: Any, rows: list[Row], key: str, title: str) -> None:
    for policy in dict.fromkeys(r["policy"] for r in rows):
        points = sorted((r["engines"], r[key]) for r in rows if r["policy"] == policy)
        points = [(n, v) for n, v in points if _finite(v)]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=policy)
    counts = sorted({r["engines"] for r in rows})
    if counts:
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("engines", fontsize=8)
    ax.set_title(title, fontsize=9)
    if not rows:
        _empty(ax, "no fleet rows in this run")


def _slow(ax: Any, rows: list[Row], plain: dict[tuple[str, int], Row]) -> None:
    """Session time and stall per policy, with one engine slowed and without."""
    ax.set_title("one slow engine: session s and stall s per policy", fontsize=9)
    if not rows:
        _empty(ax, "no slow-engine rows in this run")
        return
    labels: list[str] = []
    values: list[tuple[float, float]] = []
    for row in rows:
        other = plain.get((row["policy"], row["engines"]))
        for name, pick in _SLOW_BARS:
            labels.append(f"{row['policy']}\n{name}")
            values.append((pick(row), pick(other) if other else float("nan")))
    xs = range(len(labels))
    slow = ax.bar([x - 0.2 for x in xs], [v[0] for v in values], 0.4, label="one slow engine")
    base = ax.bar([x + 0.2 for x in xs], [v[1] for v in values], 0.4, label="none slow")
    for bars, ys in ((slow, [v[0] for v in values]), (base, [v[1] for v in values])):
        ax.bar_label(bars, labels=[f"{y:.2f}" if _finite(y) else "" for y in ys], fontsize=6)
    ax.set_xticks(list(xs), labels, fontsize=7)


_SLOW_BARS: tuple[tuple[str, Callable[[Row], float]], ...] = (
    ("session", lambda r: float(r["session_s"])),
    ("stall", lambda r: float(r["stall_ms"]) / 1e3),
)


def _nodes(ax: Any, rows: list[Row]) -> None:
    ax.set_title("nodes: session time (s) by engine placement", fontsize=9)
    if not rows:
        _empty(ax, "no nodes section in this run\n(python -m benchmarks --nodes 3)")
        return
    _bars(
        ax,
        [
            {**r, "config": "nodes " + ",".join(map(str, r["nodes"])), "design": r["policy"]}
            for r in rows
        ],
        "session_s",
        ax.get_title(),
        "{:.2f}",
    )


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
