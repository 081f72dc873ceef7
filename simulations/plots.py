"""PNG plots of the WAN and incentive simulations (matplotlib, Agg backend, written where the caller says)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_wan(out: dict[str, Any], results: dict[str, Any], directory: Path) -> list[Path]:
    """Time to target and tokens/s per codec, and per-schedule throughput; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    codecs = out["codecs"]
    names = list(codecs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(names, [codecs[n]["time_to_target_s"] / 3600 for n in names], color=["tab:gray", "tab:green"])
    axes[0].set_ylabel("hours to target loss")
    axes[0].set_title(f"{out['preset']}: speedup {out['speedup_vs_dense']:.1f}x")
    axes[1].bar(names, [codecs[n]["tokens_per_s"] for n in names], color=["tab:gray", "tab:green"])
    axes[1].set_ylabel("tokens/s")
    axes[1].set_yscale("log")
    axes[1].set_title("simulated throughput")
    fig.tight_layout()
    first = directory / f"wan_{out['preset']}_codecs.png"
    fig.savefig(first, dpi=100)
    plt.close(fig)
    written = [first]
    if "schedules" in out:
        fig, ax = plt.subplots(figsize=(6, 4))
        scheds = list(out["schedules"])
        width = 0.4
        for i, codec in enumerate(names):
            ax.bar(
                [j + i * width for j in range(len(scheds))],
                [out["schedules"][s][f"{codec}_tokens_per_s"] for s in scheds],
                width=width,
                label=codec,
            )
        ax.set_xticks([j + width / 2 for j in range(len(scheds))], scheds)
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s")
        ax.legend()
        ax.set_title("throughput by schedule")
        fig.tight_layout()
        second = directory / f"wan_{out['preset']}_schedules.png"
        fig.savefig(second, dpi=100)
        plt.close(fig)
        written.append(second)
    return written


def plot_incentives(out: dict[str, Any], directory: Path) -> list[Path]:
    """Net earnings per class and honest share vs true compute fraction; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    classes = list(out["net_earnings"])
    values = [out["net_earnings"][c] for c in classes]
    axes[0].bar(classes, values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
    axes[0].axhline(0, color="black", linewidth=0.8)
    axes[0].set_ylabel(f"mean net earnings per node ({out['unit']})")
    axes[0].set_title("net earnings by behaviour")
    honest = out["honest_nodes"]
    axes[1].scatter([h["true_fraction"] for h in honest], [h["share"] for h in honest], s=12)
    hi = max([h["true_fraction"] for h in honest] + [h["share"] for h in honest] + [1e-9])
    axes[1].plot([0, hi], [0, hi], color="black", linewidth=0.8)
    axes[1].set_xlabel("true compute fraction")
    axes[1].set_ylabel("share of minted units")
    axes[1].set_title(f"honest nodes (max error {out['honest_share_error']:.2e})")
    fig.tight_layout()
    path = directory / "incentives.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
