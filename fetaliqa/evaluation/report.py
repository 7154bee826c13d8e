"""Write an evaluation (`fetaliqa.evaluation.evaluate`) as `metrics.json`, PNG plots and `report.html` at any fsspec URL.

A scoring run's report: run info, headline frame metrics, confusion matrix, PR curve, per-sweep and per-case
tables, score traces, the ACOUSLIC-AI challenge's metrics, excluded cases. Challenge-format predictions
have no frame scores: their report holds the run info, the challenge's metrics and the excluded cases.
`evaluate`, `Evaluation` and `CaseTrace` are re-exported from `fetaliqa.evaluation.evaluate`.
"""

from __future__ import annotations

import html
import json

import numpy as np

from fetaliqa.evaluation.evaluate import CaseTrace, Evaluation, Fov, evaluate, evaluate_predictions
from fetaliqa.evaluation.page import fmt, page, safe_name, table
from fetaliqa.evaluation.plots import pr_curve_png, trace_png
from fetaliqa.inputs import storage
from fetaliqa.inputs.storage import StorageOptions

__all__ = ["CaseTrace", "Evaluation", "Fov", "evaluate", "evaluate_predictions", "write_report", "MAX_CASE_PLOTS"]

MAX_CASE_PLOTS = 12

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
        plots[f"traces_{safe_name(trace.case_id)}.png"] = trace_png(trace, per_case.get(trace.case_id), seg)
    for name, data in plots.items():
        fs.pipe_file(f"{root}/{name}", data)
    document = dict(evaluation.metrics, plots=sorted(plots))
    fs.pipe_file(f"{root}/metrics.json", json.dumps(document, indent=2, allow_nan=False).encode())
    fs.pipe_file(f"{root}/report.html", render_html(document, traces[:max(0, max_case_plots)]).encode())
    return storage.join(output_url, "report.html")


def render_html(document: dict, traces: list[CaseTrace]) -> str:
    """The report page: run info, headline metrics, confusion matrix, PR curve, per-sweep and per-case
    tables, score traces, excluded cases. PNGs are referenced by relative path (files beside the page)."""
    run, frame = document["run"], document["frame_metrics"]
    cases = document["case_metrics"]
    seg = run["task"] == "seg"
    esc = html.escape
    parts = ["<h1>Frame quality assessment: evaluation report</h1>",
             table(["run", ""], [["scores", run["scores"]], ["ground truth (archive)", run["data"]],
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
             table(["metric", "value", "what it means"], _headline_rows(frame, cases["aggregate"], seg), "headline"),
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
             table(["sweep", "frames", "truly positive", "predicted positive", "TP", "FP", "FN", "precision",
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
            name = f"traces_{safe_name(trace.case_id)}.png"
            parts.append(f"<figure><img src='{esc(name)}' alt='score traces of case {esc(trace.case_id)}'>"
                         f"<figcaption>Case {esc(trace.case_id)}.</figcaption></figure>")
    parts.append("<p class='note'>The case metrics above (headline and per case) follow fetaliqa.evaluation.metrics, whose "
                 "rules differ from the ACOUSLIC-AI challenge's own evaluation code in places (see its "
                 "documentation): they are not leaderboard numbers. The next section's are.</p>")
    parts += [_acouslic_html(document["acouslic"]), _excluded_html(document["excluded_cases"])]
    return page("fetaliqa evaluation", parts)


def render_predictions_html(document: dict) -> str:
    """The report page of challenge-format predictions: run info, the challenge's metrics, excluded cases."""
    run = document["run"]
    esc = html.escape
    return page("fetaliqa evaluation", [
        "<h1>Challenge-format predictions: evaluation report</h1>",
        table(["run", ""], [["predictions", run["predictions"]], ["ground truth (archive)", run["data"]],
                             ["cases evaluated", f"{run['cases_evaluated']} of {run['cases_in_archive']} in the "
                                                 f"archive; {run['cases_excluded']} excluded (listed below)"],
                             ["evaluated at", run["evaluated_at"]]], "info"),
        *(f"<p class='note'>{esc(note)}</p>" for note in run["notes"]),
        _acouslic_html(document["acouslic"]), _excluded_html(document["excluded_cases"])])


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
        table(["metric", "value", "what it means"],
               [[name, _inf(value), text] for name, value, text in rows], "headline"),
        "<p class='note'>inf: the challenge's Dice of an empty annotation against an empty prediction is "
        "SimpleITK's inf (metrics.json holds null there), and its plain means carry it into the mean Dice and "
        "the score.</p>",
        table(["case", "selected frame", "WFSS", "Dice", "AC (mm)", "reference AC (mm)", "NAE AC"], per_case)])


def _inf(value):
    return "inf" if value is None else value


def _excluded_html(excluded: list[dict]) -> str:
    return "<h2>Excluded cases</h2>\n" + (
        table(["case", "reason", "detail"], [[e["case_id"], e["reason"], e["message"]] for e in excluded])
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
    return head + table(["metric", "value"], rows)


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
    return table(header, rows)


def _mm(value: float | None) -> str | None:
    return None if value is None else f"{value:.1f}"


def _threshold_text(between: list) -> str:
    low, high = between
    text = "the checkpoint's, implied by the run's positive column: score "
    if low is not None and high is not None:
        return text + f"above {low:.4g} and at most {high:.4g}"
    return text + (f"above {low:.4g} (no frame flagged)" if high is None else f"at most {high:.4g} (every frame flagged)")
