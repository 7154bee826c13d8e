"""`fetaliqa report` on hand-made scoring outputs with known answers: decisions, shares and their Wilson intervals,
ranking, sweep coverage, rescan list, AC centiles, gallery, errors; the page shows what summary.json holds; only
committed parts count; object storage through the S3 endpoint on loopback."""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
from pathlib import Path

import pytest
from handmade_runs import (EARLIER_CASES_SCHEMA, case_row, error_row, jpeg, run_record, write_run,
                           write_uncommitted_part)
from scipy.stats import binomtest

from fetaliqa.errors import FetaliqaError
from fetaliqa.evaluation import growth
from fetaliqa.evaluation.run_report import RESCAN_COLUMNS, summarise_run, wilson_interval, write_run_report
from fetaliqa.inputs import storage
from fetaliqa.score.schema import FRAMES_SCHEMA
from jobs import report as report_job

RUN_ID = "20260301T220000-abcdef"
SITES = {"North": (24, lambda i: i % 4 != 0), "South": (21, lambda i: i % 3 == 0), "Tiny": (5, lambda i: i == 0)}
DEVICES = {"North": ("Acme", "U1"), "South": ("Beta", "V2"), "Tiny": ("Acme", "U1")}
MONTHS = {"North": "2026-01-17", "South": "2026-02-03", "Tiny": "2026-02-28"}


def known_cases() -> list[dict]:
    """54 cases: North 24 (18 usable), South 21 (7 usable), Tiny 5 (1 usable; its case 1 has 4 sweeps), and 4
    stacked images without context (all usable). Usable case j holds sweep 1 + j % 6, and sweep 6 when j is even."""
    cases, usable_count = [], 0
    for site, (n, is_usable) in SITES.items():
        for i in range(n):
            sweeps = []
            if is_usable(i):
                sweeps = sorted({1 + usable_count % 6} | ({6} if usable_count % 2 == 0 else set()))
                usable_count += 1
            manufacturer, model = DEVICES[site]
            cases.append(case_row(f"{site.lower()}-{i:02d}", sweeps, 0.9 - i / 100 if sweeps else 0.1 + i / 100,
                                  RUN_ID, institution=site, station=f"{site}-1", manufacturer=manufacturer,
                                  device_model=model, study_date=MONTHS[site], sweeps=4 if site == "Tiny" and i == 1
                                  else 6, best_frame_image=jpeg(len(cases))))
    for i in range(4):
        sweeps = sorted({1 + usable_count % 6} | ({6} if usable_count % 2 == 0 else set()))
        usable_count += 1
        cases.append(case_row(f"stacked-{i}", sweeps, 0.95, RUN_ID, best_frame_image=jpeg(100 + i)))
    return cases


ERRORS = [error_row(f"bad-{i}", "truncated" if i < 4 else "not_an_image", RUN_ID) for i in range(5)]


@pytest.fixture(scope="module")
def known_run(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("known") / "scores")
    cases = known_cases()
    write_run(out, run_record(RUN_ID, cases={"listed": 59, "skipped": 0, "scored": 54, "failed": 5, "retried": 0}),
              cases, ERRORS, cases_per_part=20)
    return out


@pytest.fixture(scope="module")
def known_report(known_run, tmp_path_factory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("known-report")
    return write_run_report(known_run, str(folder), gallery_cap=5, sample=6, seed=3), folder


def wilson(k: int, n: int) -> list[float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [ci.low, ci.high]


def test_wilson_interval_matches_scipy():
    for k, n in [(0, 1), (1, 1), (0, 20), (7, 21), (18, 24), (50, 100), (999, 1000), (3, 100_000)]:
        assert wilson_interval(k, n) == pytest.approx(wilson(k, n), abs=1e-12)
    assert wilson_interval(0, 0) == (None, None)


def test_decisions_overall_by_site_device_and_month(known_report):
    summary, _ = known_report
    decisions = summary["decisions"]
    assert decisions["overall"] == {"cases": 54, "usable": 30, "share": 30 / 54,
                                    "ci95": pytest.approx(wilson(30, 54), abs=1e-12)}
    assert decisions["rescan"] == 24
    site = decisions["site"]
    # South (7/21) is worse than North (18/24); Tiny has too few cases to rank, the stacked images no site
    assert [(g["value"], g["rank"], g["cases"], g["usable"]) for g in site["groups"]] == [
        ("South", 1, 21, 7), ("North", 2, 24, 18), ("Tiny", None, 5, 1)]
    assert (site["ranked"], site["unknown_cases"]) == (2, 4)
    assert "InstitutionName" in site["from"]
    for group in site["groups"]:
        assert group["share"] == group["usable"] / group["cases"]
        assert group["ci95"] == pytest.approx(wilson(group["usable"], group["cases"]), abs=1e-12)
    device = {g["value"]: (g["cases"], g["usable"]) for g in decisions["device"]["groups"]}
    assert device == {"Acme U1": (29, 19), "Beta V2": (21, 7)}
    month = {g["value"]: (g["cases"], g["usable"]) for g in decisions["month"]["groups"]}
    assert month == {"2026-01": (24, 18), "2026-02": (26, 8)}
    assert decisions["month"]["unknown_cases"] == 4


def test_sweep_coverage_counts_cases_whose_sweep_held_a_usable_frame(known_report):
    summary, _ = known_report
    cases = known_cases()
    for row in summary["sweep_coverage"]:
        k = row["sweep"]
        having = [c for c in cases if c["sweeps"] >= k]
        usable = sum(k in c["usable_sweeps"] for c in having)
        assert (row["cases"], row["usable"]) == (len(having), usable)
        assert row["ci95"] == pytest.approx(wilson(usable, len(having)), abs=1e-12)
    assert [r["cases"] for r in summary["sweep_coverage"]] == [54, 54, 54, 54, 53, 53]
    # usable cases j = 0..29 hold sweep 1 + j % 6 (5 each) and sweep 6 when j is even (15, 5 of them already 6)
    assert [r["usable"] for r in summary["sweep_coverage"]] == [5, 5, 5, 5, 5, 20]


def test_rescan_csv_lists_every_rescan_case_with_its_context(known_report):
    summary, folder = known_report
    rows = list(csv.DictReader(io.StringIO((folder / "rescan.csv").read_text())))
    expected = sorted(c["case_id"] for c in known_cases() if not c["usable_sweeps"])
    assert [r["case_id"] for r in rows] == expected and len(rows) == summary["decisions"]["rescan"]
    assert list(rows[0]) == list(RESCAN_COLUMNS)
    north = next(r for r in rows if r["case_id"] == "north-00")
    expected_context = {"institution": "North", "station": "North-1", "manufacturer": "Acme", "device_model": "U1",
                        "study_date": "2026-01-17", "usable_sweeps": "", "source": "s3://archive/north-00.mha",
                        "best_score": "0.1", "site": ""}
    assert {k: north[k] for k in expected_context} == expected_context


def test_errors_by_kind_with_up_to_three_examples(known_report):
    summary, _ = known_report
    assert [(e["error"], e["rows"], len(e["examples"])) for e in summary["errors"]] == [
        ("truncated", 4, 3), ("not_an_image", 1, 1)]
    assert summary["errors"][0]["examples"][0] == ERRORS[0]["message"]
    assert (summary["output"]["cases"], summary["output"]["failed_cases"]) == (54, 5)
    assert summary["run"]["cases"]["listed"] == 59


def test_gallery_shows_the_rescans_nearest_the_threshold_and_a_seeded_sample(known_report, known_run):
    summary, folder = known_report
    gallery = summary["gallery"]
    cases = {c["case_id"]: c for c in known_cases()}
    rescans = sorted((c for c in cases.values() if not c["usable_sweeps"]), key=lambda c: (-c["best_score"], c["case_id"]))
    shown = [i for i in gallery["items"] if i["decision"] == "rescan"]
    assert [i["case_id"] for i in shown] == [c["case_id"] for c in rescans[:5]]
    usable_ids = [c for c in cases if cases[c]["usable_sweeps"]]
    drawn = sorted(sorted(usable_ids, key=lambda c: hashlib.md5(f"3/{c}".encode()).hexdigest())[:6])
    assert [i["case_id"] for i in gallery["items"] if i["decision"] == "usable"] == drawn
    for item in gallery["items"]:  # each image is the stored best frame, byte for byte
        assert (folder / item["image"]).read_bytes() == cases[item["case_id"]]["best_frame_image"]
    assert len(list((folder / "gallery").iterdir())) == 11
    again = summarise_run(known_run, gallery_cap=5, sample=6, seed=3)["gallery"]["items"]
    assert [i["case_id"] for i in again] == [i["case_id"] for i in gallery["items"]]


def cells(*values) -> str:
    return "".join(f"<td>{html.escape(str(v))}</td>" for v in values)


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def test_the_page_shows_the_summary_figures(known_report):
    summary, folder = known_report
    page = (folder / "report.html").read_text()
    assert json.loads((folder / "summary.json").read_text())["decisions"] == summary["decisions"]
    overall = summary["decisions"]["overall"]
    assert cells("all cases", 54, 30, 24, percent(30 / 54), f"[{percent(overall['ci95'][0])}, "
                 f"{percent(overall['ci95'][1])}]") in page
    for dimension in ("site", "device", "month"):
        for g in summary["decisions"][dimension]["groups"]:
            rank = [] if dimension != "site" else [g["rank"] if g["rank"] is not None else "unranked"]
            row = cells(*rank, g["value"], g["cases"], g["usable"], percent(g["share"]),
                        f"[{percent(g['ci95'][0])}, {percent(g['ci95'][1])}]")
            assert row in page, (dimension, g)
    for s in summary["sweep_coverage"]:
        assert cells(s["sweep"], s["cases"], s["usable"], percent(s["share"]),
                     f"[{percent(s['ci95'][0])}, {percent(s['ci95'][1])}]") in page
    assert "at least <b>20</b> cases (2 of 3 sites)" in page
    assert "Research use, not diagnosis" in page
    assert page.count("loading='lazy'") == len(summary["gallery"]["items"]) == 11
    assert cells("truncated", 4, " | ".join(summary["errors"][0]["examples"])) in page
    for name in summary["files"]:
        assert (folder / name).is_file() and f"href='{name}'" in page


def test_an_uncommitted_part_is_ignored(tmp_path):
    out = str(tmp_path / "scores")
    cases = known_cases()
    write_run(out, run_record(RUN_ID), cases, ERRORS, cases_per_part=20)
    write_uncommitted_part(out, RUN_ID, [case_row(f"ghost-{i}", [], 0.2, RUN_ID) for i in range(10)])
    summary = write_run_report(out, str(tmp_path / "report"))
    assert summary["decisions"]["overall"]["cases"] == 54 and summary["decisions"]["rescan"] == 24
    assert "ghost" not in (tmp_path / "report" / "rescan.csv").read_text()


def seg_cases() -> list[dict]:
    """SEG cases with AC: at GA 30 weeks, AC at z -2 (a), 0 (b), +2 (c), +1.5 (d); e without GA; f outside the standard
    (GA 41); g usable without AC; h rescan."""
    mean, sd = growth.intergrowth_ac_mean_sd_mm(30.0)
    acs = {"a": mean - 2 * sd, "b": mean, "c": mean + 2 * sd, "d": mean + 1.5 * sd, "e": 250.0, "f": 300.0, "g": None}
    cases = [case_row(f"case-{k}", [2], 0.2, RUN_ID, ac_mm=None if ac is None else float(ac), best_frame_image=jpeg(i))
             for i, (k, ac) in enumerate(acs.items())]
    return cases + [case_row("case-h", [], 0.004, RUN_ID, best_frame_image=jpeg(9))]


def test_ac_section_with_case_info_gestational_ages(tmp_path):
    out = str(tmp_path / "scores")
    cases = seg_cases()
    write_run(out, run_record(RUN_ID, task="seg"), cases)
    info = tmp_path / "info.csv"
    info.write_text("case_id,ga_weeks,site,date,extra\ncase-a,30,Clinic A,2026-05-02,x\ncase-b,30,,,\n"
                    "case-c,30,,,\ncase-d,30,,,\ncase-f,41,,,\ncase-g,30,,,\n")
    summary = write_run_report(out, str(tmp_path / "report"), case_info_url=str(info))
    ac = summary["ac"]
    by_id = {c["case_id"]: c["ac_mm"] for c in cases}
    assert (ac["cases"], ac["usable_without_ac"], ac["with_ga"], ac["with_centile"]) == (6, 1, 5, 4)
    assert [r["case_id"] for r in ac["below_10th"]] == ["case-a"]
    assert [r["case_id"] for r in ac["above_90th"]] == ["case-c", "case-d"]  # highest centile first
    assert ac["below_10th"][0]["z"] == pytest.approx(-2, abs=0.01)
    assert ac["below_10th"][0]["centile"] == pytest.approx(2.3, abs=0.05)
    assert ac["below_10th_share"]["ci95"] == pytest.approx(wilson(1, 4), abs=1e-12)
    hadlock = [float(growth.hadlock_ga_weeks(by_id[c])) for c in sorted(by_id) if by_id[c] is not None]
    assert ac["hadlock_ga_weeks"]["n"] == 6 and ac["hadlock_ga_weeks"]["mean"] == pytest.approx(
        sum(hadlock) / 6, abs=0.005)
    assert set(ac["citations"]) == set(growth.CITATIONS)
    site = summary["decisions"]["site"]
    assert [(g["value"], g["cases"]) for g in site["groups"]] == [("Clinic A", 1)] and site["unknown_cases"] == 7
    assert summary["decisions"]["month"]["groups"][0]["value"] == "2026-05"
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Hadlock" in page and "Papageorghiou" in page and "INTERGROWTH-21st" in page
    flagged = list(csv.DictReader(io.StringIO((tmp_path / "report" / "ac_outliers.csv").read_text())))
    assert [(r["flag"], r["case_id"]) for r in flagged] == [("below_10th", "case-a"), ("above_90th", "case-c"),
                                                             ("above_90th", "case-d")]
    assert summary["distributions"]["best_score"]["threshold_between"] == [0.004, 0.2]


@pytest.mark.parametrize("content, problem", [
    ("id,site\n1,A\n", "no case_id column"),
    ("case_id,site\ncase-a,A\ncase-a,B\n", "case_id is empty or repeated (case-a)"),
    ("case_id,ga_weeks\ncase-a,thirty\n", "ga_weeks holds values that are not numbers"),
    ("case_id,date\ncase-a,02/05/2026\n", "date '02/05/2026' is not a date written YYYY-MM-DD"),
])
def test_a_bad_case_info_is_one_line_naming_the_file(tmp_path, content, problem):
    out = str(tmp_path / "scores")
    write_run(out, run_record(RUN_ID, task="seg"), seg_cases())
    info = tmp_path / "info.csv"
    info.write_text(content)
    with pytest.raises(FetaliqaError) as err:
        summarise_run(out, str(info))
    assert str(err.value).startswith(f"{info}: ") and problem in str(err.value) and "\n" not in str(err.value)


def test_case_info_parquet_keeps_ids_and_takes_precedence(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = str(tmp_path / "scores")
    write_run(out, run_record(RUN_ID), known_cases())
    pq.write_table(pa.table({"case_id": ["north-00", "north-01"], "site": ["Elsewhere", "Elsewhere"],
                             "device": ["Gamma X", None]}), tmp_path / "info.parquet")
    summary = summarise_run(out, str(tmp_path / "info.parquet"))
    site = {g["value"]: g["cases"] for g in summary["decisions"]["site"]["groups"]}
    assert site == {"North": 22, "South": 21, "Tiny": 5, "Elsewhere": 2}
    device = {g["value"]: g["cases"] for g in summary["decisions"]["device"]["groups"]}
    assert device == {"Acme U1": 28, "Beta V2": 21, "Gamma X": 1}
    assert summary["report"]["case_info_columns"] == ["site", "device"]


def test_a_cls_run_written_before_the_decision_columns_renders(tmp_path):
    """cases/ without decision, usable_sweeps, image or context (an earlier fetaliqa): decisions from positives,
    usable sweeps from the committed frames/ rows; no site, device, month, AC or images."""
    out = str(tmp_path / "scores")
    cases = [case_row(f"c{i}", [1, 3] if i < 3 else [], 0.8 if i < 3 else 0.3, RUN_ID) for i in range(5)]
    frames = [{"case_id": c["case_id"], "sweep": s, "frame": 10 * s, "score": 0.8, "positive": True, "model": "m",
               "run_id": RUN_ID} for c in cases for s in c["usable_sweeps"]]
    frames += [{"case_id": c["case_id"], "sweep": 2, "frame": 25, "score": 0.3, "positive": False, "model": "m",
                "run_id": RUN_ID} for c in cases]
    assert all(set(f) <= set(FRAMES_SCHEMA.names) for f in frames)
    write_run(out, run_record(RUN_ID), cases, frames=frames, cases_schema=EARLIER_CASES_SCHEMA)
    summary = write_run_report(out, str(tmp_path / "report"))
    assert summary["report"]["derived_columns"] == ["decision", "usable_sweeps"]
    assert summary["decisions"]["overall"]["usable"] == 3
    assert [r["usable"] for r in summary["sweep_coverage"]] == [3, 0, 3, 0, 0, 0]
    assert summary["ac"] is None and summary["decisions"]["site"]["groups"] == []
    assert not summary["gallery"]["images"] and len(summary["gallery"]["items"]) == 5
    page = (tmp_path / "report" / "report.html").read_text()
    assert "No site known for any case" in page and "has no AC" in page and "<img loading" not in page


def test_a_run_without_rescans_renders(tmp_path):
    out = str(tmp_path / "scores")
    write_run(out, run_record(RUN_ID, task="seg"), [case_row(f"c{i}", [2], 0.3, RUN_ID, ac_mm=200.0)
                                                    for i in range(3)])
    summary = write_run_report(out, str(tmp_path / "report"))
    assert summary["decisions"]["rescan"] == 0 and summary["ac"]["cases"] == 3
    assert summary["distributions"]["best_score"]["threshold_between"] == [None, 0.3]
    assert (tmp_path / "report" / "rescan.csv").read_text().splitlines() == [
        ",".join(f'"{c}"' for c in RESCAN_COLUMNS)]
    assert "<h3>Rescan cases</h3>\n<p>None.</p>" in (tmp_path / "report" / "report.html").read_text()


def test_report_on_s3_reads_and_writes_through_fsspec(s3_bucket, known_run):
    bucket, options = s3_bucket
    out, report = f"{bucket}/scores", f"{bucket}/scores/morning"
    cases = known_cases()
    write_run(out, run_record(RUN_ID), cases, ERRORS, cases_per_part=20, storage_options=options)
    storage.filesystem(out, options)[0].pipe_file(f"{out}/cases/{RUN_ID}-99.parquet", b"not even parquet")
    assert report_job.main(["--scores", out, "--storage-options", json.dumps(options)]) == 0
    fs = storage.filesystem(report, options)[0]
    summary = json.loads(fs.cat_file(f"{report}/summary.json"))
    local = summarise_run(known_run)
    for key in ("decisions", "sweep_coverage", "errors", "distributions"):
        assert summary[key] == local[key], key
    assert fs.cat_file(f"{report}/{summary['gallery']['items'][0]['image']}") == next(
        c["best_frame_image"] for c in cases if c["case_id"] == summary["gallery"]["items"][0]["case_id"])
    assert fs.exists(f"{report}/report.html") and fs.exists(f"{report}/rescan.csv")


def test_the_command_prints_a_line_and_refuses_a_folder_without_run_json(known_run, tmp_path, capsys):
    assert report_job.main(["--scores", known_run, "--output", str(tmp_path / "r")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("fetaliqa report: 54 cases, 30 usable (55.6% [") and line.endswith(
        f"{tmp_path / 'r' / 'report.html'}")
    assert report_job.main(["--scores", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == (f"python -m jobs.report: error: {tmp_path / 'nothing'}: no run.json: "
                                               "not an output of `fetaliqa score`")


@pytest.mark.parametrize("scores", ["cls_scores", "seg_scores"])
def test_the_report_of_a_real_scoring_run_matches_its_parquet(scores, request, tmp_path):
    """A `fetaliqa score` run of the synthetic archive: the report's figures are the committed tables' own."""
    import pyarrow.compute as pc

    from fetaliqa.score.ledger import read_table

    out = request.getfixturevalue(scores)
    summary = write_run_report(out, str(tmp_path / "report"))
    cases, frames = read_table(out, "cases"), read_table(out, "frames")
    usable = {c for c, p in zip(cases["case_id"].to_pylist(), cases["positives"].to_pylist()) if p > 0}
    assert summary["decisions"]["overall"]["cases"] == cases.num_rows
    assert summary["decisions"]["overall"]["usable"] == len(usable)
    assert summary["output"]["frames"] == frames.num_rows
    positive = frames.filter(frames["positive"])
    for row in summary["sweep_coverage"]:
        held = set(positive.filter(pc.equal(positive["sweep"], row["sweep"]))["case_id"].to_pylist())
        assert row["usable"] == len(held)
    rescan = list(csv.DictReader(io.StringIO((tmp_path / "report" / "rescan.csv").read_text())))
    assert sorted(r["case_id"] for r in rescan) == sorted(set(cases["case_id"].to_pylist()) - usable)
    if scores == "seg_scores":
        with_ac = [c for c, a, p in zip(*(cases[n].to_pylist() for n in ("case_id", "ac_mm", "positives")))
                   if a is not None and p > 0]
        assert summary["ac"]["cases"] == len(with_ac)
    else:
        assert summary["ac"] is None
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["decisions"] == summary["decisions"]
