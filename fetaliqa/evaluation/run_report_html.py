"""The morning report's page, drawn from `run_report.summarise_run`'s summary alone: every figure on it is in
summary.json. Shares are written as percentages to 0.1, with their 95% Wilson interval in brackets."""

from __future__ import annotations

import html

from fetaliqa.evaluation.page import page, table

esc = html.escape
RESEARCH_USE = ("Research use, not diagnosis. The decisions, measurements and centiles on this page come from a model "
                "and from population formulas; they support reviewing scans and auditing acquisition, not the care "
                "of any one pregnancy.")


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def interval(ci: list) -> str:
    return "n/a" if ci[0] is None else f"[{percent(ci[0])}, {percent(ci[1])}]"


def render_run_report(summary: dict) -> str:
    """report.html: the run, decisions, sweep coverage, distributions, AC (SEG runs), gallery, errors."""
    report = summary["report"]
    body = ["<h1>The morning after: report of a scoring run</h1>",
            f"<p class='banner'><b>{esc(RESEARCH_USE)}</b></p>",
            table(["report", ""], [["scores", report["scores"]],
                                   ["case-info", report["case_info"] or "none (context from the DICOM headers only)"],
                                   ["written at", report["written_at"]], ["fetaliqa", report["fetaliqa"]]], "info"),
            _run_html(summary["run"], summary["output"]),
            _decisions_html(summary["decisions"], report),
            _coverage_html(summary["sweep_coverage"]),
            _distributions_html(summary["distributions"], summary["decisions"]["overall"]),
            _ac_html(summary["ac"], summary["run"].get("task")),
            _gallery_html(summary["gallery"]),
            _errors_html(summary["errors"], summary["output"]),
            "<p class='note'>Files beside this page: " + ", ".join(
                f"<a href='{esc(name)}'>{esc(name)}</a>" for name in [*summary.get("files", []), "summary.json"])
            + ".</p>"]
    return page("fetaliqa morning report", body)


def _run_html(run: dict, output: dict) -> str:
    cases = run.get("cases") or {}
    versions = run.get("versions") or {}
    rows = [["run id", run["run_id"]], ["status", run["status"]],
            ["started / ended", f"{run['started']} / {run['ended']}"], ["seconds", run["seconds"]],
            ["input", run["input"]], ["model (checkpoint id)", run["checkpoint_id"]],
            ["architecture, task", f"{run['model']}, {run['task']}"],
            ["versions", ", ".join(f"{k} {v}" for k, v in versions.items())],
            ["cases listed", cases.get("listed")], ["cases scored", cases.get("scored")],
            ["cases failed", cases.get("failed")], ["cases skipped (complete before this run)", cases.get("skipped")],
            ["failed cases retried", cases.get("retried")], ["frames scored", run["frames"]],
            ["frames/s", run["frames_per_s"]],
            ["pseudonymised", "yes (key id " + str(run["pseudonym_key_id"]) + ")" if run.get("pseudonymized") else "no"]]
    parts = ["<h2>The run</h2>",
             "<p>The latest run into this output (run.json); the output holds every committed run's cases: "
             f"<b>{output['cases']}</b> cases scored ({output['frames']} frames, {output['positive_frames']} usable "
             f"frames) and <b>{output['failed_cases']}</b> cases that failed.</p>",
             table(["run.json", ""], rows, "info"), *(f"<p class='note'>{esc(str(note))}</p>" for note in run["notes"] or [])]
    if run["history"]:
        parts += ["<h3>Earlier runs into this output</h3>",
                  table(["run id", "status", "started", "ended", "scored", "failed", "frames", "frames/s"],
                        [[h["run_id"], h["status"], h["started"], h["ended"], (h["cases"] or {}).get("scored"),
                          (h["cases"] or {}).get("failed"), h["frames"], h["frames_per_s"]] for h in run["history"]])]
    return "\n".join(parts)


def _decisions_html(decisions: dict, report: dict) -> str:
    overall = decisions["overall"]
    derived = report["derived_columns"]
    parts = ["<h2>Decisions</h2>",
             "<p>A case is <b>usable</b> when some frame scored at or above the checkpoint's threshold, <b>rescan</b> "
             "when none did: the woman must be scanned again, or the case reviewed. Shares are of the cases scored "
             "(failed cases are under Errors), with their 95% Wilson score interval.</p>",
             table(["", "cases", "usable", "rescan", "share usable", "95% interval"],
                   [["all cases", overall["cases"], overall["usable"], decisions["rescan"], percent(overall["share"]),
                     interval(overall["ci95"])]], "headline"),
             "<p>Every rescan case, with its context, is in <a href='rescan.csv'>rescan.csv</a>.</p>"]
    if derived:
        parts.append(f"<p class='note'>This run's cases/ has no {' or '.join(derived)} column (written before "
                     "fetaliqa stored them): derived from positives and the committed frames/ rows.</p>")
    site = decisions["site"]
    parts += ["<h3>By site, worst first</h3>",
              f"<p>Site: {esc(site['from'])}. Ranked by share usable, lowest first, only sites with at least "
              f"<b>{report['min_cases_to_rank']}</b> cases ({site['ranked']} of {site['groups_total']} sites); smaller "
              f"sites follow unranked. Cases without a site: {site['unknown_cases']}.</p>",
              _groups_table("site", site, ranked=True)]
    for dimension, title in (("device", "By device"), ("month", "By month")):
        group = decisions[dimension]
        parts += [f"<h3>{title}</h3>",
                  f"<p>{esc(dimension.capitalize())}: {esc(group['from'])}. Cases without one: "
                  f"{group['unknown_cases']}.</p>", _groups_table(dimension, group, ranked=False)]
    return "\n".join(parts)


def _groups_table(name: str, section: dict, ranked: bool) -> str:
    if not section["groups"]:
        return f"<p class='note'>No {name} known for any case.</p>"
    rows = [([g["rank"] if g["rank"] is not None else "unranked"] if ranked else [])
            + [g["value"], g["cases"], g["usable"], percent(g["share"]), interval(g["ci95"])] for g in section["groups"]]
    shown = len(section["groups"])
    more = (f"<p class='note'>{shown} of {section['groups_total']} shown; summary.json holds the same.</p>"
            if shown < section["groups_total"] else "")
    return table((["rank"] if ranked else []) + [name, "cases", "usable", "share usable", "95% interval"], rows) + more


def _coverage_html(coverage: list[dict]) -> str:
    return "\n".join([
        "<h2>Sweep coverage</h2>",
        "<p>For each sweep k of the protocol, the share of cases (that have a sweep k) whose sweep k held at least "
        "one usable frame: a sweep that operators do badly shows as a low bar.</p>",
        table(["sweep", "cases with it", "usable in it", "share", "95% interval"],
              [[s["sweep"], s["cases"], s["usable"], percent(s["share"]), interval(s["ci95"])] for s in coverage]),
        "<figure><img src='sweep_coverage.png' alt='sweep coverage'><figcaption>Share of cases whose sweep k held a "
        "usable frame, with 95% Wilson intervals.</figcaption></figure>"])


def _distributions_html(distributions: dict, overall: dict) -> str:
    low, high = distributions["best_score"]["threshold_between"]
    threshold = ("" if low is None and high is None else
                 f" The checkpoint's threshold lies above {low:.4g} (highest rescan case) and at or below {high:.4g} "
                 "(lowest usable case)." if low is not None and high is not None else
                 f" Every case is on one side of the threshold (its bound: {low if low is not None else high:.4g}).")
    return "\n".join([
        "<h2>Scores and usable frames</h2>",
        f"<p>The best frame score of each of the {overall['cases']} cases (the red line: the threshold).{threshold}</p>",
        "<figure><img src='best_scores.png' alt='histogram of best scores'></figure>",
        "<p>How many frames of a usable case reached the threshold: many means an easy choice; one or two, a plane "
        "barely reached.</p>",
        "<figure><img src='usable_frames.png' alt='histogram of usable frames per case'></figure>"])


def _ac_html(ac: dict | None, task: str | None) -> str:
    if ac is None:
        return ("<h2>Abdominal circumference</h2><p class='note'>Not measured: a classification (CLS) run scores "
                "frames without a mask, so it has no AC. Score with a SEG checkpoint for AC.</p>")
    citations = ac["citations"]
    hadlock = ac["hadlock_ga_weeks"]
    parts = ["<h2>Abdominal circumference (research use, not diagnosis)</h2>",
             f"<p>AC of the best frame's mask (ellipse fit) of the <b>{ac['cases']}</b> usable cases that have one "
             f"({ac['usable_without_ac']} usable cases have none, e.g. no pixel spacing).</p>",
             table(["", "n", "mean", "median", "10th percentile", "90th percentile"],
                   [["AC (mm)", *_stat_row(ac["ac_mm"])],
                    ["GA implied by AC (weeks, Hadlock 1984)", *_stat_row(hadlock)],
                    ["AC z-score for known GA (INTERGROWTH-21st)", *_stat_row(ac["z"])]])]
    if ac["cases"]:
        parts += ["<figure><img src='ac.png' alt='histogram of AC'></figure>",
                  "<figure><img src='ga_hadlock.png' alt='histogram of gestational age implied by AC'></figure>"]
    parts += [
        "<p><b>Gestational age from AC alone</b> (Hadlock et al. 1984): GA [weeks] = 8.14 + 0.753 AC + 0.0036 "
        f"AC<sup>2</sup>, AC in cm; fitted on fetuses of 14-42 weeks, so only ACs of {hadlock['ac_range_mm'][0]}-"
        f"{hadlock['ac_range_mm'][1]} mm are converted ({hadlock['outside_range']} outside). An estimate, least "
        "certain late in pregnancy, not a dating.</p>",
        "<p><b>Growth centile</b> where the case-info gives the gestational age (<code>ga_weeks</code>, from dating): "
        "the INTERGROWTH-21st fetal growth standard (Papageorghiou et al. 2014): mean AC [mm] = -81.3243 + 11.6772 "
        "GA - 0.000561865 GA<sup>3</sup>, SD [mm] = -4.36302 + 0.121445 GA<sup>2</sup> - 0.0130256 GA<sup>3</sup> "
        "+ 0.00282143 GA<sup>3</sup> ln(GA), GA 14-40 weeks; z = (AC - mean) / SD, centile = 100 &Phi;(z). "
        f"{ac['with_ga']} usable cases with AC have a GA, {ac['with_centile']} within 14-40 weeks.</p>"]
    if ac["with_centile"]:
        below, above = ac["below_10th_share"], ac["above_90th_share"]
        parts.append(table(["", "cases", "share", "95% interval", "expected"],
                           [["below the 10th centile", ac["below_10th_count"], percent(below["share"]),
                             interval(below["ci95"]), "10%"],
                            ["above the 90th centile", ac["above_90th_count"], percent(above["share"]),
                             interval(above["ci95"]), "10%"]]))
        for name, title in (("below_10th", "Below the 10th centile (lowest first)"),
                            ("above_90th", "Above the 90th centile (highest first)")):
            listed, total = ac[name], ac[f"{name}_count"]
            parts += [f"<h3>{title}: {total} cases{f', first {len(listed)} listed' if len(listed) < total else ''}"
                      "</h3>",
                      table(["case", "sweep", "frame", "AC (mm)", "GA (weeks)", "z", "centile"],
                            [[r["case_id"], r["sweep"], r["frame"], r["ac_mm"], r["ga_weeks"], r["z"], r["centile"]]
                             for r in listed]) if listed else "<p>None.</p>"]
        parts.append("<p>All of them: <a href='ac_outliers.csv'>ac_outliers.csv</a>.</p>")
    parts.append("<h3>Sources</h3><ul>" + "".join(f"<li>{esc(text)}</li>" for text in citations.values()) + "</ul>")
    return "\n".join(parts)


def _stat_row(stats: dict) -> list:
    return [stats["n"], stats["mean"], stats["median"], stats["p10"], stats["p90"]]


def _gallery_html(gallery: dict) -> str:
    rescan = [i for i in gallery["items"] if i["decision"] == "rescan"]
    usable = [i for i in gallery["items"] if i["decision"] == "usable"]
    parts = ["<h2>Review gallery</h2>",
             "<p>The frame fetaliqa chose (the case's best score) as the model saw it (224 x 224; SEG: the predicted "
             "mask's outline in yellow). Check that a usable case shows the abdomen at the AC plane, and whether a "
             f"rescan case was missed. <b>Rescan cases</b>: {gallery['rescan_shown']} shown, at most "
             f"{gallery['rescan_cap']}, nearest the threshold first; <b>usable cases</b>: a random sample of "
             f"{gallery['usable_shown']} (at most {gallery['usable_sample']}, seed {gallery['seed']}).</p>"]
    if not gallery["images"]:
        parts.append("<p class='note'>This run's cases/ stores no best-frame images (written before fetaliqa stored "
                     "them): the gallery lists the frames to look up.</p>")
    for title, items in (("Rescan cases", rescan), ("Usable cases (random sample)", usable)):
        parts.append(f"<h3>{title}</h3>")
        parts.append("<div class='gallery'>" + "".join(_gallery_item(i) for i in items) + "</div>" if items
                     else "<p>None.</p>")
    return "\n".join(parts)


def _gallery_item(item: dict) -> str:
    caption = (f"{esc(item['case_id'])}<br>sweep {item['sweep']}, frame {item['frame']}, score {item['score']:.3f}"
               + (f", AC {item['ac_mm']:.1f} mm" if item["ac_mm"] is not None else ""))
    image = (f"<img loading='lazy' width='224' height='224' src='{esc(item['image'])}' "
             f"alt='best frame of case {esc(item['case_id'])}'>" if item["image"] else "")
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def _errors_html(errors: list[dict], output: dict) -> str:
    if not errors:
        return "<h2>Errors</h2><p>None: every case listed was scored.</p>"
    return "\n".join([
        "<h2>Errors</h2>",
        f"<p>{output['failed_cases']} cases could not be scored ({output['error_rows']} errors/ rows: a DICOM study "
        "may have a row per bad instance). A rerun of the same command retries them; a file that stays bad needs "
        "fixing at the source. Up to three example messages per kind.</p>",
        table(["kind", "rows", "examples"], [[e["error"], e["rows"], " | ".join(e["examples"])] for e in errors])])
