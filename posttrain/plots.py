"""PNG plots for the stage folders and the report (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_plot(metrics: Path, png: Path, title: str) -> Path | None:
    """Reward and KL (k1, k3) against step from an RL run's metrics.jsonl; None when nothing was logged."""
    rows = (
        [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if metrics.exists()
        else []
    )
    rows = [r for r in rows if "reward" in r]
    if not rows:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = [r["step"] for r in rows]
    ax1.plot(steps, [r["reward"] for r in rows], label="RM reward (mean)")
    ax1.set_xlabel("step"), ax1.set_ylabel("reward"), ax1.grid(alpha=0.3)
    for key, label in (("kl", "KL k1 (per token)"), ("kl_k3", "KL k3 (per token)")):
        if any(key in r for r in rows):
            ax2.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], label=label)
    ax2.set_xlabel("step"), ax2.set_ylabel("KL to the anchor"), ax2.grid(alpha=0.3), ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def reward_kl_plot(points: list[dict], png: Path, title: str = "reward vs KL to the starting policy") -> Path:
    """Points {"label", "kind" (start|run|merge), "kl_k3", "reward"} → a scatter of the RL runs and their merges.
    The KL axis is the k3 estimate per response (unbiased like k1, never negative, less noisy)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    styles = {"start": ("k", "s"), "run": ("tab:blue", "o"), "merge": ("tab:orange", "^")}
    for kind, (color, marker) in styles.items():
        pts = [p for p in points if p["kind"] == kind]
        if pts:
            ax.scatter(
                [p["kl_k3"] for p in pts],
                [p["reward"] for p in pts],
                c=color,
                marker=marker,
                label=kind,
                s=40,
            )
            for p in pts:
                ax.annotate(
                    p["label"],
                    (p["kl_k3"], p["reward"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    merges = sorted((p for p in points if p["kind"] == "merge"), key=lambda p: p["kl_k3"])
    if len(merges) > 1:
        ax.plot([p["kl_k3"] for p in merges], [p["reward"] for p in merges], c="tab:orange", alpha=0.5)
    (
        ax.set_xlabel("KL(π ‖ π_start) per response (k3 estimate)"),
        ax.set_ylabel("mean RM reward (held-out prompts)"),
    )
    ax.set_title(title, fontsize=10), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
