"""``--plot``: p50 latency vs batch per backend (p90 as the error bar) and the stage breakdown, one PNG.
matplotlib is an optional extra (``pip install 'stvfm-engine[plot]'``)."""
from __future__ import annotations

import os
from pathlib import Path

from stvfm_engine.atomic import atomic_path
from stvfm_engine.bench.roofline import STAGES
from stvfm_engine.errors import PlotError


def plot_report(report: dict, path: str | os.PathLike) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'stvfm-engine[plot]' (or pip install matplotlib)") from None
    runs = sorted({(s["runner"], s["batch"]) for s in report.get("stages", [])})
    fig, axes = plt.subplots(1, 2 if runs else 1, figsize=(12 if runs else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    for key in sorted({(r["backend"], r["precision"]) for r in report["results"]}):
        rows = sorted((r for r in report["results"] if (r["backend"], r["precision"]) == key), key=lambda r: r["batch"])
        b = [r["batch"] for r in rows]
        p50 = [r["p50_ms"] for r in rows]
        ax.errorbar(b, p50, yerr=[[0] * len(rows), [r["p90_ms"] - r["p50_ms"] for r in rows]], marker="o",
                    capsize=3, label=f"{key[0]} ({key[1]})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("latency ms (p50, bar to p90)")
    ax.set_title(f"{report['device']['name']}, {report.get('threads')} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if runs:
        ax = axes[0][1]
        labels = [f"{r} b{b}" for r, b in runs]
        bottom = [0.0] * len(runs)
        for stage in STAGES:
            share = [100 * next((s["fraction"] for s in report["stages"]
                                 if (s["runner"], s["batch"]) == run and s["stage"] == stage), 0.0) for run in runs]
            ax.bar(labels, share, bottom=bottom, label=stage)
            bottom = [a + b for a, b in zip(bottom, share)]
        ax.set_ylabel("share of forward time %")
        ax.set_title("stage breakdown")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
