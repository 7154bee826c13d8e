"""Evaluate a scoring run against an archive's annotations, and write `metrics.json` and `report.html`.

```
<scores>/frames/, cases/, errors/       (a `fetaliqa score` run)  -+
<data>/masks/stacked_fetal_abdomen/     (ground truth)             +-> evaluate() -> Evaluation
<data>/circumferences/...csv            (reference AC per sweep)  -+        |
                                                                      write_report(output)
<output>/metrics.json, report.html, pr_curve.png, traces_<case>.png  <------+
```
Ground truth: a frame is positive when its mask is non-empty (label 1 optimal or 2 suboptimal).

The operating point is the run's own: a frame is predicted positive where `positive` is true (score >= the
checkpoint's threshold, which the output does not store and need not: `positive` carries it). Threshold-free
measures (AUROC, AUPRC, the PR curve) use `score`, and the threshold that would maximise F1 on these very
frames is reported for information only (it is chosen on the test set, so it is not a result).

Case metrics (`fetaliqa.metrics.case_metrics`): the method selects a case's highest-scoring frame when that
frame is positive, else abstains. SEG runs (whose `mask_area` is set) are scored on the selected frame's
mask (`mask_png`, or an empty mask where the frame is not positive) and on AC (`cases/ac_mm`) against the
csv's AC of the selected frame's sweep; an abstaining case is scored against its first sweep with an AC
(NAE 1 if it has one). CLS runs have neither mask nor AC: soft Dice and NAE are null.

Every case is accounted for: a case in the archive or the run that cannot be evaluated is listed under
`excluded_cases` with its reason, never dropped silently: `scoring_error` (in errors/), `not_scored` (in
neither cases/ nor errors/), `not_in_archive`, `no_mask`, `mask_error` (unreadable mask), `frames_mismatch`
(frames/ rows or mask frames disagree with cases/), `mask_png` (undecodable or wrong size).

Masks are read once per case, one case at a time (a full-size mask stack is 351 MB), and only the mask is
decoded, not the image: ~0.4 s per full-size case here, against ~10 s for `read_case(..., with_mask=True)`
on a loaded 2-core machine (the image is what costs).
"""

from __future__ import annotations

import datetime
import html
import io
import json
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa

from fetaliqa import layout, metrics, storage
from fetaliqa.score.schema import CASES, ERRORS, FRAMES, read_table
from fetaliqa.archive import list_cases, read_circumferences, read_mask_stack
from fetaliqa.errors import InputError
from fetaliqa.storage import StorageOptions

LABEL_NAMES = {layout.MASK_BACKGROUND: "none", layout.MASK_OPTIMAL: "optimal", layout.MASK_SUBOPTIMAL: "suboptimal"}
MAX_CASE_PLOTS = 12


@dataclass
class CaseTrace:
    """What the plots need of one evaluated case; arrays are (T,), frame f in sweep f // (T // 6)."""

    case_id: str
    scores: np.ndarray  # float32 in [0, 1]
    positive: np.ndarray  # bool, the run's prediction
    labels: np.ndarray  # uint8 in {0, 1, 2}, from the masks
    selected: int | None  # the frame the method selects, None when it abstains
    reference_ac_mm: list = field(default_factory=list)  # 6 values (None where a sweep has no AC)


@dataclass
class Evaluation:
    """`metrics`: the JSON-ready content of metrics.json; `traces`: the evaluated cases, sorted by id."""

    metrics: dict
    traces: list[CaseTrace]


# ---------------------------------------------------------------------------------------------- evaluate


def evaluate(scores_url: str, data_url: str, storage_options: StorageOptions = None) -> Evaluation:
    """Join a scoring run with the archive's masks and compute frame, sweep and case metrics.

    scores_url : the `--output` folder of `fetaliqa score`. data_url : the ACOUSLIC-layout root that was
    scored (masks, and the circumference csv when present). Raises `InputError` when no case can be
    evaluated at all (the message counts the reasons).
    """
    so = storage_options
    frames = read_table(scores_url, FRAMES, so)
    cases = read_table(scores_url, CASES, so)
    errors = read_table(scores_url, ERRORS, so)
    archive = {c.case_id: c for c in list_cases(data_url, so)}
    try:
        circumferences, ac_note = read_circumferences(data_url, so), None
    except InputError as err:  # missing or malformed: frame metrics, WFSS and Dice do not need it
        circumferences, ac_note = {}, f"circumference csv not used ({err}): NAE of AC not computed"
    is_seg = frames.num_rows > 0 and frames["mask_area"].null_count < frames.num_rows

    rows = _group_frames(frames)
    excluded = _unscored_cases(archive, cases, errors)
    traces, per_case = [], []
    for case in sorted(cases.to_pylist(), key=lambda c: c["case_id"]):
        case_id = case["case_id"]
        try:
            trace, result = _evaluate_case(case, rows.get(case_id), archive.get(case_id), circumferences,
                                           is_seg, so)
        except _Excluded as why:
            excluded.append({"case_id": case_id, "source": case["source"], "reason": why.reason,
                             "message": why.message})
            continue
        traces.append(trace)
        per_case.append(result)
    if not traces:
        reasons = ", ".join(f"{n} {r}" for r, n in _count_reasons(excluded).items()) or "no cases in the run"
        raise InputError(scores_url, f"no scored case could be evaluated against {data_url} ({reasons})")

    labels = np.concatenate([t.labels for t in traces]) > 0
    scores = np.concatenate([t.scores for t in traces])
    positive = np.concatenate([t.positive for t in traces])
    sweeps = np.concatenate([layout.sweep_of_frame(np.arange(len(t.scores)), len(t.scores)) + 1 for t in traces])
    notes = [ac_note] if ac_note and is_seg else []
    return Evaluation(metrics={
        "run": {"scores": scores_url, "data": data_url, "task": "seg" if is_seg else "cls",
                "models": sorted(set(frames["model"].to_pylist())),
                "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "cases_in_run": cases.num_rows, "cases_evaluated": len(traces), "cases_excluded": len(excluded),
                "notes": notes},
        "frame_metrics": frame_summary(labels, scores, positive),
        "per_sweep": [{"sweep": int(s), **_counts_at_positive(labels[sweeps == s], positive[sweeps == s])}
                      for s in np.unique(sweeps)],
        "case_metrics": {"aggregate": metrics.aggregate_case_metrics(per_case), "per_case": per_case},
        "excluded_cases": excluded,
    }, traces=traces)


def frame_summary(labels: np.ndarray, scores: np.ndarray, positive: np.ndarray) -> dict:
    """Frame metrics at the run's operating point, plus threshold-free ones and the best-F1 threshold.

    labels, positive : (N,) bool (ground truth; the run's prediction). scores : (N,) float.
    Counts, accuracy, precision, recall, F1 and specificity come from `positive`; AUROC and AUPRC (None
    with one class only) from `scores`. `threshold_between` is the interval the run's threshold must lie in
    ((highest score of a negative prediction, lowest score of a positive one]; an end is None when there is
    no such frame). `best_f1` is {threshold, f1, precision, recall} of `metrics.best_f1_threshold`.
    """
    summary = _counts_at_positive(labels, positive)
    ranked = metrics.frame_metrics(labels, scores, threshold=0.5)  # only its threshold-free entries are used
    best_threshold, _ = metrics.best_f1_threshold(labels, scores)
    at_best = metrics.frame_metrics(labels, scores, best_threshold)
    return {**summary, "auroc": ranked["auroc"], "auprc": ranked["auprc"],
            "predicted_positives": int(positive.sum()),
            "threshold_between": [float(scores[~positive].max()) if (~positive).any() else None,
                                  float(scores[positive].min()) if positive.any() else None],
            "best_f1": {key: at_best[key] for key in ("threshold", "f1", "precision", "recall")}}


def _counts_at_positive(labels: np.ndarray, positive: np.ndarray) -> dict:
    """`metrics.frame_metrics` of the bool predictions themselves (scored 0/1 at threshold 0.5), without
    its threshold-free entries, which are meaningless on 0/1 scores."""
    result = metrics.frame_metrics(labels, positive.astype(np.float64), threshold=0.5)
    keep = ("n", "positives", "tp", "fp", "tn", "fn", "accuracy", "precision", "recall", "f1", "specificity")
    return {key: result[key] for key in keep}


class _Excluded(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _group_frames(frames: pa.Table) -> dict[str, dict]:
    """frames/ rows by case, sorted by frame: {case_id: {"frame", "score", "positive" arrays, "png" column}}."""
    if frames.num_rows == 0:
        return {}
    table = frames.select(["case_id", "frame", "score", "positive", "mask_png"]).sort_by(
        [("case_id", "ascending"), ("frame", "ascending")])
    ids = table["case_id"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    frame, score = table["frame"].to_numpy(), table["score"].to_numpy()
    positive = table["positive"].to_numpy(zero_copy_only=False)
    png = table["mask_png"].combine_chunks()
    return {ids[a]: {"frame": frame[a:b], "score": score[a:b], "positive": positive[a:b].astype(bool),
                     "png": png.slice(a, b - a)} for a, b in zip(starts, ends)}


def _unscored_cases(archive: dict, cases: pa.Table, errors: pa.Table) -> list[dict]:
    """Cases with a scoring error, and archive cases the run holds nothing for."""
    excluded, failed = [], set()
    for error in errors.to_pylist():
        case_id = layout.case_id_of(error["source"])
        failed.add(case_id)
        excluded.append({"case_id": case_id, "source": error["source"], "reason": "scoring_error",
                         "message": f"{error['error']}: {error['message']}"})
    scored = set(cases["case_id"].to_pylist())
    for case_id in sorted(set(archive) - scored - failed):
        excluded.append({"case_id": case_id, "source": archive[case_id].image_uri, "reason": "not_scored",
                         "message": "in the archive but in neither cases/ nor errors/ of the run "
                                    "(not in its input, or the run was interrupted: rerun score to complete it)"})
    return excluded


def _evaluate_case(case: dict, rows: dict | None, case_ref, circumferences: dict, is_seg: bool,
                   storage_options: StorageOptions) -> tuple[CaseTrace, dict]:
    """Metrics of one scored case; raises `_Excluded` with the reason when it cannot be evaluated."""
    case_id, n = case["case_id"], case["frames"]
    if case_ref is None:
        raise _Excluded("not_in_archive", f"scored case {case_id} is not in the --data archive")
    if case_ref.mask_uri is None:
        raise _Excluded("no_mask", f"no mask for case {case_id} in {layout.MASKS_DIR}/")
    if rows is None or not np.array_equal(rows["frame"], np.arange(n)):
        found = 0 if rows is None else len(rows["frame"])
        raise _Excluded("frames_mismatch", f"cases/ says {n} frames; frames/ holds {found} rows, not frames 0..{n - 1}")
    try:
        gt = read_mask_stack(case_ref.mask_uri, None, storage_options)
    except InputError as err:
        raise _Excluded("mask_error", f"{err.kind}: {err}") from err
    if gt.shape[0] != n:
        raise _Excluded("frames_mismatch", f"the mask has {gt.shape[0]} frames; the run scored {n}")

    scores, positive = rows["score"], rows["positive"]
    frames_per_sweep = n // layout.SWEEPS_PER_CASE
    # the method selects its top frame when that frame is positive: a threshold that says just that
    top = int(np.argmax(scores))
    threshold = -np.inf if positive[top] else np.inf
    selected = metrics.select_frame(scores, threshold)
    reference = circumferences.get(case_id, [None] * layout.SWEEPS_PER_CASE)
    pred_mask = predicted_ac = reference_ac = None
    if is_seg:
        pred_mask = np.zeros(gt.shape[1:], bool)
        png = None if selected is None else rows["png"][selected].as_py()
        if png is not None:
            decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
            if decoded is None or decoded.shape != gt.shape[1:]:
                found = "not a PNG" if decoded is None else f"{decoded.shape}"
                raise _Excluded("mask_png", f"mask_png of frame {selected} is {found}; the ground truth is "
                                            f"{gt.shape[1:]}")
            pred_mask = decoded > 0
        predicted_ac = case["ac_mm"]
        known = [ac for ac in reference if ac is not None]
        reference_ac = (reference[layout.sweep_of_frame(selected, n)] if selected is not None
                        else (known[0] if known else None))
    result = metrics.case_metrics(scores, gt, pred_mask, reference_ac, predicted_ac, frames_per_sweep,
                                  threshold=threshold)
    labels = metrics.frame_labels(gt)
    truth = labels > 0
    per_case = {
        "case_id": case_id, "frames": n, "gt_positive_frames": int(truth.sum()),
        "predicted_positive_frames": int(positive.sum()),
        "tp": int((truth & positive).sum()), "fp": int((~truth & positive).sum()), "fn": int((truth & ~positive).sum()),
        "selected_frame": selected,
        "selected_sweep": None if selected is None else layout.sweep_of_frame(selected, n) + 1,
        "selected_label": None if selected is None else LABEL_NAMES[int(labels[selected])],
        "top_score": float(scores[top]),
        "wfss": result["wfss"], "soft_dice": result["soft_dice"], "nae_ac": result["nae_ac"],
        "predicted_ac_mm": None if predicted_ac is None or selected is None else float(predicted_ac),
        "reference_ac_mm": reference_ac,
    }
    trace = CaseTrace(case_id, scores.astype(np.float32), positive, labels, selected, list(reference))
    return trace, per_case


def _count_reasons(excluded: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in excluded:
        counts[item["reason"]] = counts.get(item["reason"], 0) + 1
    return counts


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
        title += "   WFSS " + _fmt(case["wfss"]) + "   soft Dice " + _fmt(case["soft_dice"]) + \
                 "   NAE AC " + _fmt(case["nae_ac"])
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
    report's URL. Score traces are drawn for the first `max_case_plots` evaluated cases (sorted by id)."""
    fs, root = storage.filesystem(output_url, storage_options)
    fs.makedirs(root, exist_ok=True)
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
    parts.append("<h2>Excluded cases</h2>")
    excluded = document["excluded_cases"]
    parts.append(_table(["case", "reason", "detail"], [[e["case_id"], e["reason"], e["message"]] for e in excluded])
                 if excluded else "<p>None: every case of the archive and of the run was evaluated.</p>")
    parts.append("<p class='note'>Case metrics follow fetaliqa.metrics, whose rules differ from the ACOUSLIC-AI "
                 "challenge's own evaluation code in places (see its documentation): these are not leaderboard "
                 "numbers.</p></body></html>")
    return "\n".join(parts)


def _headline_rows(frame: dict, aggregate: dict, seg: bool) -> list[list]:
    rows = [["F1", frame["f1"], "balance of precision and recall (1 is perfect)"],
            ["precision (PPV)", frame["precision"], "of the frames flagged, the share truly showing the abdomen"],
            ["recall (sensitivity)", frame["recall"], "of the frames truly showing the abdomen, the share flagged"],
            ["specificity", frame["specificity"], "of the other frames, the share not flagged"],
            ["accuracy", frame["accuracy"], "share of frames classified correctly"],
            ["AUROC", frame["auroc"], "threshold-free ranking quality of the scores (0.5 is chance)"],
            ["AUPRC", frame["auprc"], f"area under the precision-recall curve (chance: {frame['positives'] / frame['n']:.3f})"],
            ["WFSS", aggregate["wfss"], "mean weighted frame selection score per case: 1 optimal frame selected, "
                                        "0.6 suboptimal, 0 unannotated"]]
    if seg:
        rows += [["soft Dice", aggregate["soft_dice"], "overlap of the selected frame's mask with the nearest annotated mask"],
                 ["NAE of AC", aggregate["nae_ac"], "abdominal circumference error relative to the reference (0 is perfect)"]]
    return rows


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
              "its annotation", "WFSS"]
    rows = [[c["case_id"], c["frames"], c["gt_positive_frames"], c["predicted_positive_frames"], c["tp"], c["fp"],
             c["fn"], "none" if c["selected_frame"] is None else c["selected_frame"], c["selected_sweep"],
             c["selected_label"], c["wfss"]] for c in per_case]
    if seg:
        header += ["soft Dice", "AC (mm)", "reference AC (mm)", "NAE AC"]
        for row, c in zip(rows, per_case):
            row += [c["soft_dice"], _mm(c["predicted_ac_mm"]), _mm(c["reference_ac_mm"]), c["nae_ac"]]
    return _table(header, rows)


def _mm(value: float | None) -> str | None:
    return None if value is None else f"{value:.1f}"


def _threshold_text(between: list) -> str:
    low, high = between
    text = "the checkpoint's, implied by the run's positive column: score "
    if low is not None and high is not None:
        return text + f"above {low:.4g} and at most {high:.4g}"
    return text + (f"above {low:.4g} (no frame flagged)" if high is None else f"at most {high:.4g} (every frame flagged)")
