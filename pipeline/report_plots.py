"""The report's plots, drawn with matplotlib from stats.json alone and embedded as base64 PNG.

Each function takes the statistics dict and returns the PNG as base64 text, or None when there is
nothing to draw.
"""
from __future__ import annotations

import base64
import io

import numpy as np

from pipeline.report_concepts import HEATMAP_MAX_CONCEPTS

BLUE, ORANGE = "#4a7bb7", "#b7794a"


def plain_text(label: str) -> str:
    """A label for matplotlib: '$' would start mathtext (and a bad formula fails the whole plot)."""
    return str(label).replace("$", r"\$")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def import_in_background() -> None:
    """Start importing matplotlib (about 0.4 s) on a daemon thread, for a caller that will draw
    later and is waiting on other processes meanwhile (`run` while resample's workers work).

    Only once the caller's worker processes are started: a process with threads does not fork warm
    workers (pipeline/warm_workers.py). Python's import lock makes a plot drawn before it is done
    wait for it.
    """
    import threading

    threading.Thread(target=_pyplot, name="import-matplotlib", daemon=True).start()


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _largest_gap_before(stats: dict, concept: str) -> float:
    shares = stats["shares"]["before"]["concepts"][concept]["shares"]
    gaps = [
        abs(share - stats["targets"][value]) for value, share in shares.items() if share is not None
    ]
    return max(gaps) if gaps else -1.0


def heatmap_concepts(stats: dict) -> list[str]:
    """The heat map's rows: stats["heatmap"]["concepts"] when present, else the concepts whose share
    was furthest from its target before (the statistics of an older report)."""
    if "heatmap" in stats:
        return list(stats["heatmap"]["concepts"])
    before = stats["shares"]["before"]["concepts"]
    return sorted(before, key=lambda c: (-_largest_gap_before(stats, c), c))[:HEATMAP_MAX_CONCEPTS]


def plot_heatmaps(stats: dict) -> str | None:
    """Attribute share per concept before, planned and realized, side by side (rows: the concepts
    that moved most, largest gap before first; hatched where the stage has no annotated row)."""
    plt = _pyplot()
    concepts = heatmap_concepts(stats)
    if not concepts:
        return None
    values = list(stats["targets"])
    panels = [(stage, title) for stage, title in (("before", "before"), ("planned", "planned"),
                                                  ("realized", "realized (release)"))
              if stage in stats["shares"]]
    figure, axes = plt.subplots(
        1, len(panels), figsize=(2.5 + 1.3 * len(values) * len(panels), 1.5 + 0.27 * len(concepts)),
        sharey=True, squeeze=False)
    # Hatched, not a colour: coolwarm's own middle (a share of 0.5) is grey.
    colormap = plt.get_cmap("coolwarm").with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    for axis, (stage, title) in zip(axes[0], panels):
        shares = stats["shares"][stage]["concepts"]
        grid = np.array([[
            np.nan if shares.get(c, {}).get("shares", {}).get(v) is None else shares[c]["shares"][v]
            for v in values
        ] for c in concepts], dtype=np.float64).reshape(len(concepts), len(values))
        axis.patch.set_facecolor("white")
        axis.patch.set_hatch("////")
        axis.patch.set_edgecolor("#8c8c8c")
        image = axis.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap=colormap,
                            aspect="auto")
        axis.set_xticks(range(len(values)), [plain_text(v.split(":", 1)[-1]) for v in values],
                        rotation=45)
        axis.set_yticks(range(len(concepts)), [plain_text(c) for c in concepts])
        axis.set_title(title)
    figure.suptitle("perceived attribute share per concept")
    figure.colorbar(image, ax=list(axes[0]), shrink=0.6,
                    label="share among annotated rows of the concept")
    return _png(figure)


def plot_q(stats: dict) -> str:
    """The distribution of keep probabilities over the annotated rows (counted signatures)."""
    plt = _pyplot()
    edges, rows = np.array(stats["q_distribution"]["edges"]), np.array(
        stats["q_distribution"]["rows"])
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.bar(edges[:-1], rows, width=np.diff(edges), align="edge", color=BLUE)
    axis.set_xlabel("keep probability q")
    axis.set_ylabel("rows")
    axis.set_title("distribution of q (rows without attributes all get the same q)")
    return _png(figure)


def plot_price_of_balance(stats: dict) -> str | None:
    """The largest feasible keep rate against the association gap, with the release's own point."""
    curve = stats.get("price_of_balance") or []
    if not curve:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.plot([p["association_gap"] for p in curve], [p["max_keep_rate"] for p in curve],
              marker="o", color=BLUE)
    gap = stats["gaps"]["association"]
    if isinstance(gap, (int, float)):
        axis.scatter([gap], [stats["keep_rate"]], color=ORANGE, zorder=3, label="this release")
        axis.legend()
    axis.set_xlabel("association gap (share)")
    axis.set_ylabel("largest feasible keep rate")
    axis.set_title("the price of balance")
    return _png(figure)


def plot_proxies(stats: dict) -> str | None:
    """The proxies balance found, by score."""
    proxies = [p for p in stats["proxies"] if "score" in p]
    if not proxies:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 0.8 + 0.3 * len(proxies)))
    axis.barh([plain_text(p["concept"]) for p in proxies][::-1],
              [p["score"] for p in proxies][::-1], color=ORANGE)
    axis.set_xlabel("support-weighted deviation of attribute share")
    axis.set_title("proxies chosen")
    return _png(figure)
