"""The report's plot: cumulative training FLOPs over steps against the threshold lines (PNG bytes)."""
from __future__ import annotations

import io


def cumulative_plot_png(report: dict) -> bytes | None:
    """PNG of the report's cumulative series, or None when matplotlib is missing or there are no steps."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = report["series"]["cumulative_training_flops"]
    if not points:
        return None
    result = report["compliance"]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    try:
        ax.plot([p[0] for p in points], [max(p[3], 1) for p in points], color="#1f5fa8",
                label="cumulative training FLOP")
        limit = result["threshold_flops"]
        ax.axhline(limit, color="#b22222", linestyle="-", label=f"threshold {result['text']['threshold_flops']}")
        ax.axhline(limit * result["approaching_fraction"], color="#d98c1a", linestyle="--",
                   label=f"approaching ({result['approaching_fraction']:.0%})")
        ax.set_yscale("log")
        ax.set_xlabel("step (all runs of the project, in order)")
        ax.set_ylabel("FLOP")
        ax.set_title("Cumulative training compute against the threshold")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)
