"""Write an evaluation (`fetaliqa.evaluation.evaluate`) as `metrics.json`, PNG plots and `report.html` at any fsspec URL.

A scoring run's report: run info, headline frame metrics, confusion matrix, PR curve, per-sweep and per-case
tables, score traces, the ACOUSLIC-AI challenge's metrics, excluded cases. Challenge-format predictions
have no frame scores: their report holds the run info, the challenge's metrics and the excluded cases.
`evaluate`, `Evaluation` and `CaseTrace` are re-exported from `fetaliqa.evaluation.evaluate`.
"""

from __future__ import annotations

import html
import io
import json

import numpy as np

from fetaliqa.evaluation.evaluate import CaseTrace, Evaluation, Fov, evaluate, evaluate_predictions
from fetaliqa.inputs import layout
from fetaliqa.inputs import storage
from fetaliqa.inputs.storage import StorageOptions

__all__ = ["CaseTrace", "Evaluation", "Fov", "evaluate", "evaluate_predictions", "write_report", "MAX_CASE_PLOTS"]

MAX_CASE_PLOTS = 12

# ---------------------------------------------------------------------------------------------- plots


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
        title += ("   selection score " + _fmt(case["selection_score"]) + "   nearest Dice "
                  + _fmt(case["nearest_dice"]) + "   relative AC error " + _fmt(case["relative_ac_error"]))
    fig.suptitle(title, fontsize=9)
    handles = [Patch(color="tab:green", alpha=0.3, label="annotated optimal"),
               Patch(color="tab:orange", alpha=0.3, label="annotated suboptimal"),
               plt.Line2D([], [], color="tab:blue", label="score (mask area / image area)" if seg else "score"),
               plt.Line2D([], [], color="tab:red", marker="o", ls="", ms=3, label="predicted positive"),
               plt.Line2D([], [], color="black", marker="*", ls="--", label="selected frame")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return _figure_png(fig)


# ---------------------------------------------------------------------------------------------- writing


def write_report(evaluation: Evaluation, output_url: str, storage_options: StorageOptions = None,
                 max_case_plots: int = MAX_CASE_PLOTS) -> str:
    """Write metrics.json, the PNG plots and report.html under `output_url` (any fsspec URL); return the
    report's URL. Score traces are drawn for the first `max_case_plots` evaluated cases (sorted by id).
    An evaluation of predictions (no "frame_metrics") has no plots: metrics.json and report.html only."""
    fs, root = storage.filesystem(output_url, storage_options)
    fs.makedirs(root, exist_ok=True)
    if "frame_metrics" not in evaluation.metrics:
        document = dict(evaluation.metrics, plots=[])
        fs.pipe_file(f"{root}/metrics.json", json.dumps(document, indent=2, allow_nan=False).encode())
        fs.pipe_file(f"{root}/report.html", render_predictions_html(document).encode())
        return storage.join(output_url, "report.html")
    traces = evaluation.traces
    labels = np.concatenate([t.labels for t in traces]) > 0
    scores = np.concatenate([t.scores for t in traces]).astype(np.float64)
    per_case = {c["case_id"]: c for c in evaluation.metrics["case_metrics"]["per_case"]}
    seg = evaluation.metrics["run"]["task"] == "seg"

    plots = {"pr_curve.png": pr_curve_png(labels, scores, evaluation.metrics["frame_metrics"])}
    for trace in traces[:max(0, max_case_plots)]:
        plots[f"traces_{_safe_name(trace.case_id)}.png"] = trace_png(trace, per_case.get(trace.case_id), seg)
    for name, data in plots.items():
        fs.pipe_file(f"{root}/{name}", data)
    document = dict(evaluation.metrics, plots=sorted(plots))
    fs.pipe_file(f"{root}/metrics.json", json.dumps(document, indent=2, allow_nan=False).encode())
    fs.pipe_file(f"{root}/report.html", render_html(document, traces[:max(0, max_case_plots)]).encode())
    return storage.join(output_url, "report.html")


def _safe_name(case_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in case_id)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,.info td,.headline td:nth-child(3){text-align:left}
.cm td{min-width:7em}
figure{margin:1em 0 2em}figcaption{font-size:.9em;color:#444;max-width:900px}img{max-width:100%}
.note{font-size:.9em;color:#555}"""


def render_html(document: dict, traces: list[CaseTrace]) -> str:
    """The report page: run info, headline metrics, confusion matrix, PR curve, per-sweep and per-case
    tables, score traces, excluded cases. PNGs are referenced by relative path (files beside the page)."""
    run, frame = document["run"], document["frame_metrics"]
    cases = document["case_metrics"]
    seg = run["task"] == "seg"
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fetaliqa evaluation</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>Frame quality assessment: evaluation report</h1>",
             _table(["run", ""], [["scores", run["scores"]], ["ground truth (archive)", run["data"]],
                                  ["model (checkpoint id)", ", ".join(run["models"])],
                                  ["task", "segmentation (SEG)" if seg else "classification (CLS)"],
                                  ["cases evaluated", f"{run['cases_evaluated']} of {run['cases_in_run']} scored; "
                                                      f"{run['cases_excluded']} excluded (listed below)"],
                                  ["frames evaluated", frame["n"]],
                                  ["operating threshold", _threshold_text(frame["threshold_between"])],
                                  ["evaluated at", run["evaluated_at"]]],
                    "info"),
             *(f"<p class='note'>{esc(note)}</p>" for note in run["notes"]),
             "<h2>Headline metrics</h2>",
             "<p>A frame is <b>truly positive</b> when the annotators drew an abdomen mask on it (optimal or "
             "suboptimal plane); it is <b>predicted positive</b> when the model's score reaches the checkpoint's "
             "threshold. Only a few frames in 100 are positive, so accuracy says little: F1 is the main measure.</p>",
             _table(["metric", "value", "what it means"], _headline_rows(frame, cases["aggregate"], seg), "headline"),
             "<h2>Confusion matrix (frames)</h2>", _confusion_html(frame),
             _paper_html(document["frame_metrics_paper"]),
             "<h2>Precision-recall curve</h2>",
             "<figure><img src='pr_curve.png' alt='precision-recall curve'><figcaption>Precision against recall "
             "of the frame scores as the threshold varies (blue). Red dot: this run's operating point (the "
             "checkpoint's threshold). Square: the threshold that would maximise F1 on these same frames "
             f"(score &ge; {frame['best_f1']['threshold']:.3g}; for information, not a fair result since it is "
             "chosen on the test frames). Grey curves: equal F1; dotted line: precision of random "
             "guessing.</figcaption></figure>",
             "<h2>Per sweep</h2>",
             _table(["sweep", "frames", "truly positive", "predicted positive", "TP", "FP", "FN", "precision",
                     "recall", "F1"],
                    [[s["sweep"], s["n"], s["positives"], s["tp"] + s["fp"], s["tp"], s["fp"], s["fn"],
                      s["precision"], s["recall"], s["f1"]] for s in document["per_sweep"]]),
             "<h2>Per case</h2>", _per_case_html(cases["per_case"], seg)]
    if traces:
        parts.append(f"<h2>Score traces ({len(traces)} of {len(cases['per_case'])} cases, by case id)</h2>"
                     "<p>Each figure shows the model's score for every frame of one case, one row per sweep. "
                     "Shaded: frames the annotators marked (green optimal, orange suboptimal plane). Red dots: "
                     "frames predicted positive. Star and dashed line: the frame the model selects for measurement "
                     "(its highest score, if positive). The reference AC of a sweep is written beside it.</p>")
        for trace in traces:
            name = f"traces_{_safe_name(trace.case_id)}.png"
            parts.append(f"<figure><img src='{esc(name)}' alt='score traces of case {esc(trace.case_id)}'>"
                         f"<figcaption>Case {esc(trace.case_id)}.</figcaption></figure>")
    parts.append("<p class='note'>The case metrics above (headline and per case) follow fetaliqa.evaluation.metrics, whose "
                 "rules differ from the ACOUSLIC-AI challenge's own evaluation code in places (see its "
                 "documentation): they are not leaderboard numbers. The next section's are.</p>")
    parts += [_acouslic_html(document["acouslic"]), _excluded_html(document["excluded_cases"]), "</body></html>"]
    return "\n".join(parts)


def render_predictions_html(document: dict) -> str:
    """The report page of challenge-format predictions: run info, the challenge's metrics, excluded cases."""
    run = document["run"]
    esc = html.escape
    return "\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>fetaliqa evaluation</title>"
        f"<style>{_CSS}</style></head><body>",
        "<h1>Challenge-format predictions: evaluation report</h1>",
        _table(["run", ""], [["predictions", run["predictions"]], ["ground truth (archive)", run["data"]],
                             ["cases evaluated", f"{run['cases_evaluated']} of {run['cases_in_archive']} in the "
                                                 f"archive; {run['cases_excluded']} excluded (listed below)"],
                             ["evaluated at", run["evaluated_at"]]], "info"),
        *(f"<p class='note'>{esc(note)}</p>" for note in run["notes"]),
        _acouslic_html(document["acouslic"]), _excluded_html(document["excluded_cases"]), "</body></html>"])


def _acouslic_html(section: dict) -> str:
    """The "acouslic" section of metrics.json as HTML: the FOV used, the aggregate, the per-case table."""
    aggregate = section["aggregate"]
    rows = [["score", aggregate["score"], "0.5 (1 - NAE) + 0.25 Dice + 0.25 WFSS, the leaderboard's ranking"],
            ["WFSS", aggregate["wfss"], "1 optimal frame selected, 0.6 suboptimal where the case has an optimal "
                                        "one, 0 unannotated or none selected"],
            ["Dice", aggregate["soft_dice"], "the selected frame's mask against the annotation inside the FOV "
                                             "(an unannotated frame: the nearest annotated one within 15, weighted)"],
            ["NAE of AC", aggregate["nae_ac"], "|reference - predicted| / max(both); 1 without an AC"]]
    per_case = [[c["case_id"], "none" if c["frame"] == -1 else c["frame"], c["wfss"], _inf(c["soft_dice"]),
                 _mm(c["ac_mm"]), _mm(c["reference_ac_mm"]), c["nae_ac"]] for c in section["per_case"]]
    return "\n".join([
        "<h2>ACOUSLIC-AI challenge metrics</h2>",
        "<p>Computed as the challenge's own evaluation code computes them (fetaliqa.evaluation.acouslic): leaderboard "
        f"numbers, means over the {len(per_case)} cases evaluated. <b>Field of view</b>: "
        f"{html.escape(section['fov'])}.</p>",
        _table(["metric", "value", "what it means"],
               [[name, _inf(value), text] for name, value, text in rows], "headline"),
        "<p class='note'>inf: the challenge's Dice of an empty annotation against an empty prediction is "
        "SimpleITK's inf (metrics.json holds null there), and its plain means carry it into the mean Dice and "
        "the score.</p>",
        _table(["case", "selected frame", "WFSS", "Dice", "AC (mm)", "reference AC (mm)", "NAE AC"], per_case)])


def _inf(value):
    return "inf" if value is None else value


def _excluded_html(excluded: list[dict]) -> str:
    return "<h2>Excluded cases</h2>\n" + (
        _table(["case", "reason", "detail"], [[e["case_id"], e["reason"], e["message"]] for e in excluded])
        if excluded else "<p>None: every case of the archive and of the run was evaluated.</p>")


def _headline_rows(frame: dict, aggregate: dict, seg: bool) -> list[list]:
    rows = [["F1", frame["f1"], "balance of precision and recall (1 is perfect)"],
            ["precision (PPV)", frame["precision"], "of the frames flagged, the share truly showing the abdomen"],
            ["recall (sensitivity)", frame["recall"], "of the frames truly showing the abdomen, the share flagged"],
            ["specificity", frame["specificity"], "of the other frames, the share not flagged"],
            ["accuracy", frame["accuracy"], "share of frames classified correctly"],
            ["AUROC", frame["auroc"], "threshold-free ranking quality of the scores (0.5 is chance)"],
            ["AUPRC", frame["auprc"], f"area under the precision-recall curve (chance: {frame['positives'] / frame['n']:.3f})"],
            ["selection score", aggregate["selection_score"], "fetaliqa's mean frame selection score per case: 1 "
             "optimal frame selected, 0.6 suboptimal, 0 unannotated (the challenge's WFSS is below)"]]
    if seg:
        rows += [["nearest Dice", aggregate["nearest_dice"],
                  "overlap of the selected frame's mask with the nearest annotated mask (fetaliqa's rule)"],
                 ["relative AC error", aggregate["relative_ac_error"],
                  "abdominal circumference error relative to the reference (0 is perfect; fetaliqa's rule)"]]
    return rows


def _paper_html(paper: dict | None) -> str:
    """metrics.json's "frame_metrics_paper": the paper's frames and rule, beside the all-frames table."""
    head = ("<h2>Paper-comparable frame metrics</h2><p>The FetalCLIP-IQA paper's own counting, to set beside "
            "its table (F1 0.757 CLS, 0.771 SEG): frames of sweeps with a reference AC only, labels from the "
            "masks at 224 x 224, and its decision rule.</p>")
    if paper is None:
        return head + "<p class='note'>Not computed: without the circumference csv the AC sweeps are unknown.</p>"
    rows = [["frames", f"{paper['n']} ({paper['frames']}) of {paper['cases']} cases"], ["rule", paper["rule"]],
            ["F1", paper["f1"]], ["precision", paper["precision"]], ["recall", paper["recall"]],
            ["specificity", paper["specificity"]], ["accuracy", paper["accuracy"]],
            ["TP / FP / FN / TN", f"{paper['tp']} / {paper['fp']} / {paper['fn']} / {paper['tn']}"]]
    if paper["pixel_f_score"] is not None:
        rows.append(["pixel F-score (the paper's SEG Dice, pooled)", paper["pixel_f_score"]])
    return head + _table(["metric", "value"], rows)


def _confusion_html(frame: dict) -> str:
    def cell(count: int, total: int) -> str:
        return f"{count} ({100 * count / total:.1f}%)" if total else str(count)

    pos, neg = frame["tp"] + frame["fn"], frame["tn"] + frame["fp"]
    return ("<table class='cm'><thead><tr><th>truth \\ prediction</th><th>predicted positive</th>"
            "<th>predicted negative</th><th>total</th></tr></thead><tbody>"
            f"<tr><th>annotated (positive)</th><td>TP {cell(frame['tp'], pos)}</td><td>FN {cell(frame['fn'], pos)}</td>"
            f"<td>{pos}</td></tr>"
            f"<tr><th>not annotated (negative)</th><td>FP {cell(frame['fp'], neg)}</td>"
            f"<td>TN {cell(frame['tn'], neg)}</td><td>{neg}</td></tr></tbody></table>"
            "<p class='note'>Percentages are of the row (the truth).</p>")


def _per_case_html(per_case: list[dict], seg: bool) -> str:
    header = ["case", "frames", "annotated", "predicted", "TP", "FP", "FN", "selected frame", "sweep",
              "its annotation", "selection score"]
    rows = [[c["case_id"], c["frames"], c["gt_positive_frames"], c["predicted_positive_frames"], c["tp"], c["fp"],
             c["fn"], "none" if c["selected_frame"] is None else c["selected_frame"], c["selected_sweep"],
             c["selected_label"], c["selection_score"]] for c in per_case]
    if seg:
        header += ["nearest Dice", "AC (mm)", "reference AC (mm)", "relative AC error"]
        for row, c in zip(rows, per_case):
            row += [c["nearest_dice"], _mm(c["predicted_ac_mm"]), _mm(c["reference_ac_mm"]), c["relative_ac_error"]]
    return _table(header, rows)


def _mm(value: float | None) -> str | None:
    return None if value is None else f"{value:.1f}"


def _threshold_text(between: list) -> str:
    low, high = between
    text = "the checkpoint's, implied by the run's positive column: score "
    if low is not None and high is not None:
        return text + f"above {low:.4g} and at most {high:.4g}"
    return text + (f"above {low:.4g} (no frame flagged)" if high is None else f"at most {high:.4g} (every frame flagged)")
