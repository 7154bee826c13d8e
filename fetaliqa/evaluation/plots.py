"""The matplotlib plots of fetaliqa's reports, as PNG bytes: `evaluate`'s (precision-recall curve, score traces)
and `report`'s (histograms of precomputed counts, shares with their intervals). Headless (Agg backend)."""

from __future__ import annotations

import io

import numpy as np

from fetaliqa.evaluation.evaluate import CaseTrace
from fetaliqa.evaluation.page import fmt
from fetaliqa.inputs import layout


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def pr_curve_png(labels: np.ndarray, scores: np.ndarray, frame: dict) -> bytes:
    """PNG of the precision-recall curve of `scores`, with the run's operating point and the best-F1 point.

    labels : (N,) bool; scores : (N,) float; frame : `frame_summary`'s dict for the same frames.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    fig, ax = plt.subplots(figsize=(6, 5))
    for f1 in (0.2, 0.4, 0.6, 0.8):  # iso-F1 lines: precision = f1 r / (2 r - f1), from precision 1 to recall 1
        recall_grid = np.linspace(f1 / (2 - f1), 1, 200)
        ax.plot(recall_grid, f1 * recall_grid / (2 * recall_grid - f1), color="0.85", lw=0.8, zorder=0)
        ax.annotate(f"F1={f1:g}", (f1 / (2 - f1), 1), fontsize=7, color="0.6", xytext=(3, -10),
                    textcoords="offset points")
    if 0 < labels.sum() < labels.size:
        precision, recall, _ = precision_recall_curve(labels, scores)
        ax.step(recall, precision, where="post", color="tab:blue", lw=1.5,
                label=f"score (AUPRC {frame['auprc']:.3f})")
    ax.axhline(labels.mean(), color="0.5", ls=":", lw=1, label=f"chance (prevalence {labels.mean():.3f})")
    ax.plot(frame["recall"], frame["precision"], "o", color="tab:red", ms=9,
            label=f"operating point: P {frame['precision']:.3f}, R {frame['recall']:.3f}, F1 {frame['f1']:.3f}")
    best = frame["best_f1"]
    ax.plot(best["recall"], best["precision"], "s", mfc="none", mec="black", ms=9,
            label=f"best F1 on these frames: {best['f1']:.3f} at score >= {best['threshold']:.3g}")
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall (sensitivity)", ylabel="precision (PPV)",
           title=f"Frame-level precision-recall ({frame['n']} frames, {frame['positives']} positive)")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the runs of True in a (K,) bool array."""
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def trace_png(trace: CaseTrace, case: dict | None = None, seg: bool = False) -> bytes:
    """PNG of one case's scores over frame index, one row per sweep, ground-truth runs shaded.

    Green shading: frames annotated optimal (1); orange: suboptimal (2). Red dots: predicted positive.
    A black dashed line and star: the selected frame. `case`: its per-case metrics, for the title. `seg`:
    scores are mask area fractions, mostly far below 1, so the score axis is scaled to the case's highest.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(trace.scores)
    k = n // layout.SWEEPS_PER_CASE
    top = max(float(trace.scores.max()) * 1.15, 1e-3) if seg else 1.05
    fig, axes = plt.subplots(layout.SWEEPS_PER_CASE, 1, figsize=(9, 1.0 * layout.SWEEPS_PER_CASE + 1.2),
                             sharey=True, squeeze=False)
    for s, ax in enumerate(axes[:, 0]):
        frames = np.arange(s * k, (s + 1) * k)
        for label, colour in ((layout.MASK_OPTIMAL, "tab:green"), (layout.MASK_SUBOPTIMAL, "tab:orange")):
            for a, b in _runs(trace.labels[frames] == label):
                ax.axvspan(frames[a] - 0.5, frames[b - 1] + 0.5, color=colour, alpha=0.3, lw=0)
        ax.plot(frames, trace.scores[frames], color="tab:blue", lw=1)
        hits = frames[trace.positive[frames]]
        ax.plot(hits, trace.scores[hits], "o", color="tab:red", ms=3)
        if trace.selected is not None and trace.selected in frames:
            ax.axvline(trace.selected, color="black", ls="--", lw=1)
            ax.plot(trace.selected, trace.scores[trace.selected], "*", color="black", ms=11, clip_on=False)
        ac = trace.reference_ac_mm[s] if s < len(trace.reference_ac_mm) else None
        ax.set_ylabel(f"sweep {s + 1}" + (f"\nAC {ac:.0f} mm" if ac is not None else ""), fontsize=8)
        ax.set_xlim(frames[0] - 0.5, frames[-1] + 0.5)
        ax.set_ylim(0, top)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("frame (index in the stack)")
    title = f"case {trace.case_id}"
    if case:
        title += ("   selection score " + fmt(case["selection_score"]) + "   nearest Dice "
                  + fmt(case["nearest_dice"]) + "   relative AC error " + fmt(case["relative_ac_error"]))
    fig.suptitle(title, fontsize=9)
    handles = [Patch(color="tab:green", alpha=0.3, label="annotated optimal"),
               Patch(color="tab:orange", alpha=0.3, label="annotated suboptimal"),
               plt.Line2D([], [], color="tab:blue", label="score (mask area / image area)" if seg else "score"),
               plt.Line2D([], [], color="tab:red", marker="o", ls="", ms=3, label="predicted positive"),
               plt.Line2D([], [], color="black", marker="*", ls="--", label="selected frame")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return _figure_png(fig)


def histogram_png(edges: list[float], counts: list[int], xlabel: str, title: str,
                  marker: tuple[float, str] | None = None) -> bytes:
    """PNG of a histogram already counted: `counts[i]` values in [edges[i], edges[i + 1]) (len(edges) = len(counts) + 1).

    `marker`: (x, label) of a vertical dashed line, e.g. the decision threshold.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges_array = np.asarray(edges, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(edges_array[:-1], counts, width=np.diff(edges_array), align="edge", color="tab:blue", edgecolor="white", lw=0.5)
    if marker is not None:
        ax.axvline(marker[0], color="tab:red", ls="--", lw=1.2, label=marker[1])
        ax.legend(fontsize=8)
    ax.set(xlabel=xlabel, ylabel="cases", title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def shares_png(labels: list[str], shares: list[float], lows: list[float], highs: list[float], xlabel: str,
               title: str) -> bytes:
    """PNG of shares (0-1) as bars, one per label, each with its interval [low, high] as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = np.asarray(shares, dtype=np.float64)
    # clipped at 0: a Wilson bound at a share of 0 or 1 may differ from it by a rounding error
    errors = np.vstack([share - np.asarray(lows, np.float64), np.asarray(highs, np.float64) - share]).clip(0)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(len(labels)), share, color="tab:green", yerr=errors, capsize=3, ecolor="0.3")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set(ylim=(0, 1.05), xlabel=xlabel, ylabel="share of cases", title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)
