"""The morning report of a scoring run (`fetaliqa report`): decisions, quality by site, device, month and sweep,
AC and growth centiles, a review gallery. For any run, annotated or not.

Reads the committed parts of `cases/` and `errors/` (`fetaliqa.score.ledger.committed_files`) and `run.json`
with DuckDB: every aggregate is a query over the Parquet files; only single columns of the cases with an AC
and the gallery's rows (their best-frame JPEGs, from the files that hold them) come into Python. Object
storage is read through the output's fsspec filesystem registered with DuckDB (no DuckDB extension, no network
beyond the store). Writes, under the report's folder:

```
report.html      the page (`fetaliqa.evaluation.run_report_html`), images as files beside it, loaded lazily
summary.json     every figure on the page (`summarise_run`'s dict)
rescan.csv       every `rescan` case: RESCAN_COLUMNS
ac_outliers.csv  SEG runs with gestational ages: every case below the 10th or above the 90th centile
gallery/*.jpg    the gallery's best frames, as the scoring run stored them (`cases/` best_frame_image)
*.png            histograms and shares (`fetaliqa.evaluation.plots`)
```
Context of a case: `site` is the case-info's `site`, else the DICOM InstitutionName (`institution`); `device`
the case-info's `device`, else "Manufacturer ManufacturerModelName"; `month` the first 7 characters of the
case-info's `date`, else of the DICOM StudyDate; `ga_weeks` only from the case-info.
Runs written before `cases/` had `decision` and `usable_sweeps` get them derived: `usable` when `positives` > 0
(the same rule: a frame at or above the threshold), the sweeps from the committed `frames/` rows.
"""

from __future__ import annotations

import datetime
import io
import json
import math

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fetaliqa import __version__
from fetaliqa.errors import FetaliqaError, InputError
from fetaliqa.evaluation import growth, plots
from fetaliqa.evaluation.page import safe_name
from fetaliqa.evaluation.run_report_html import render_run_report
from fetaliqa.inputs import layout, storage
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.redact import public_url
from fetaliqa.score import ledger
from fetaliqa.score.schema import CASES, ERRORS, FRAMES, RUN_RECORD

GALLERY_RESCAN_CAP = 200      # rescan cases shown, nearest the threshold first
GALLERY_USABLE_SAMPLE = 48    # usable cases drawn at random (seeded)
MIN_CASES_TO_RANK = 20        # a site with fewer cases is listed but not ranked: its share is too uncertain
MAX_TABLE_ROWS = 200          # rows of a site, device or month table shown (the page stays small at any scale)
MAX_AC_LISTED = 100           # cases listed below the 10th and above the 90th centile each (all in ac_outliers.csv)
Z_95 = 1.959963984540054      # the standard normal's 97.5th percentile

CONTEXT_COLUMNS = ("study_date", "institution", "station", "manufacturer", "device_model")
CASE_INFO_COLUMNS = ("site", "device", "date", "ga_weeks")
RESCAN_COLUMNS = ("case_id", "source", "best_score", "best_sweep", "usable_sweeps", *CONTEXT_COLUMNS,
                  *CASE_INFO_COLUMNS)

# cases/ columns the report reads, as DuckDB types (fetaliqa.score.schema.CASES_SCHEMA): a missing one reads as null
_CASES_COLUMNS = {
    "case_id": "VARCHAR", "frames": "INTEGER", "positives": "INTEGER", "best_frame": "INTEGER",
    "best_sweep": "TINYINT", "best_score": "FLOAT", "ac_mm": "FLOAT", "sweeps": "TINYINT", "source": "VARCHAR",
    "decision": "VARCHAR", "usable_sweeps": "TINYINT[]", **{c: "VARCHAR" for c in CONTEXT_COLUMNS}}
_ERRORS_COLUMNS = {"case_id": "VARCHAR", "source": "VARCHAR", "error": "VARCHAR", "message": "VARCHAR"}


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion k / n (95% by default); (None, None) when n is 0.

    Closed form: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), p = k/n. Unlike p -+ z sqrt(p(1-p)/n)
    it stays inside [0, 1] and is not degenerate at k = 0 or k = n.
    """
    if n == 0:
        return None, None
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)


def share(k: int, n: int) -> dict:
    """{"cases": n, "usable": k, "share": k / n, "ci95": [low, high]} (share and interval None when n is 0)."""
    low, high = wilson_interval(k, n)
    return {"cases": n, "usable": k, "share": k / n if n else None, "ci95": [low, high]}


# ---------------------------------------------------------------------------------------------- reading


class RunTables:
    """A DuckDB connection over one scoring output, with the views the report queries:

    `cases_raw` (committed cases/ files, the report's columns, `filename`), `errors`, `info` (the case-info) and
    `c`: one row per case with `decision`, `usable_sweeps` and its context (`site`, `device`, `month`, `ga_weeks`).
    """

    def __init__(self, scores_url: str, case_info_url: str | None = None, storage_options: StorageOptions = None):
        self.scores_url, self.storage_options = scores_url, storage_options
        self.con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                          "autoload_known_extensions": False, "memory_limit": "1GB"})
        if not storage.is_local(scores_url):
            self.con.register_filesystem(storage.filesystem(scores_url, storage_options)[0])
        self.run = read_run_record(scores_url, storage_options)
        self.case_files = self._paths(CASES)
        self.cases_columns = self._columns(self.case_files)
        self._view("cases_raw", self.case_files, _CASES_COLUMNS, self.cases_columns, filename=True)
        error_files = self._paths(ERRORS)
        self._view("errors", error_files, _ERRORS_COLUMNS, self._columns(error_files))
        self.derived = [name for name in ("decision", "usable_sweeps") if name not in self.cases_columns]
        if "usable_sweeps" in self.derived:
            self._usable_sweeps_from_frames()
        self.case_info_columns = self._case_info(case_info_url, storage_options)
        self.con.execute(_CASE_VIEW.format(
            decision="k.decision" if "decision" not in self.derived
            else "CASE WHEN k.positives > 0 THEN 'usable' ELSE 'rescan' END",
            usable_sweeps="k.usable_sweeps" if "usable_sweeps" not in self.derived
            else "coalesce(f.usable_sweeps, []::TINYINT[])",
            frames_join="" if "usable_sweeps" not in self.derived else "LEFT JOIN usable_from_frames f USING (case_id)"))

    def _paths(self, table: str) -> list[str]:
        files = ledger.committed_files(self.scores_url, table, self.storage_options)
        if storage.is_local(self.scores_url):
            root = storage.filesystem(self.scores_url)[1]
            return [f"{root}/{f}" for f in files]
        return [storage.join(self.scores_url, f) for f in files]

    def _columns(self, paths: list[str]) -> set[str]:
        """Column names of the first file: every part of one output has one schema (one fetaliqa version)."""
        if not paths:
            return set()
        return {row[0] for row in self.con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [paths[:1]]).fetchall()}

    def _view(self, name: str, paths: list[str], wanted: dict[str, str], present: set[str], filename=False) -> None:
        select = ", ".join(f'"{c}"' if c in present else f"NULL::{t} AS {c}" for c, t in wanted.items())
        if not paths:
            self.con.execute(f"CREATE TEMP VIEW {name} AS SELECT {select}{', NULL AS filename' if filename else ''} "
                             "FROM (SELECT 1) WHERE false")
            return
        files = _sql_list(paths)
        self.con.execute(f"CREATE TEMP VIEW {name} AS SELECT {select}{', filename' if filename else ''} "
                         f"FROM read_parquet({files}{', filename = true' if filename else ''})")

    def _usable_sweeps_from_frames(self) -> None:
        frame_files = self._paths(FRAMES)
        if not frame_files:
            self.con.execute("CREATE TEMP TABLE usable_from_frames (case_id VARCHAR, usable_sweeps TINYINT[])")
            return
        files = _sql_list(frame_files)
        self.con.execute("CREATE TEMP TABLE usable_from_frames AS SELECT case_id, list_sort(list_distinct(list(sweep))) "
                         f"AS usable_sweeps FROM read_parquet({files}) WHERE positive GROUP BY case_id")

    def _case_info(self, url: str | None, storage_options: StorageOptions) -> list[str]:
        """Register the case-info as table `info` (every CASE_INFO_COLUMNS column, null where absent); its columns."""
        table, present = (read_case_info(url, storage_options) if url else
                          (pa.table({"case_id": pa.array([], pa.string())}), []))
        for column in CASE_INFO_COLUMNS:
            if column not in table.column_names:
                table = table.append_column(column, pa.nulls(table.num_rows, pa.float64() if column == "ga_weeks"
                                                             else pa.string()))
        self.con.register("info_arrow", table.select(["case_id", *CASE_INFO_COLUMNS]))
        self.con.execute("CREATE TEMP TABLE info AS SELECT * FROM info_arrow")
        return present

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        return self.con.execute(sql, params or []).fetchall()


_CASE_VIEW = """CREATE TEMP VIEW c AS SELECT k.case_id, k.source, k.frames, k.positives, k.best_frame, k.best_sweep,
  k.best_score, k.ac_mm, k.sweeps, {decision} AS decision, {usable_sweeps} AS usable_sweeps,
  k.study_date, k.institution, k.station, k.manufacturer, k.device_model,
  i.site AS info_site, i.device AS info_device, i.date AS info_date, i.ga_weeks,
  coalesce(i.site, k.institution) AS site,
  coalesce(i.device, nullif(concat_ws(' ', k.manufacturer, k.device_model), '')) AS device,
  left(coalesce(i.date, k.study_date), 7) AS month, k.filename
FROM cases_raw k LEFT JOIN info i USING (case_id) {frames_join}"""


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_list(texts: list[str]) -> str:
    """A DuckDB list literal of quoted strings: ``['a', 'b']``."""
    return "[" + ", ".join(_sql_text(t) for t in texts) + "]"


def read_run_record(scores_url: str, storage_options: StorageOptions = None) -> dict:
    """The output's run.json; a one-line error when there is none (not an output of `fetaliqa score`)."""
    fs, root = storage.filesystem(scores_url, storage_options)
    try:
        return json.loads(fs.cat_file(f"{root}/{RUN_RECORD}"))
    except FileNotFoundError:
        raise FetaliqaError(f"{public_url(scores_url)}: no {RUN_RECORD}: not an output of `fetaliqa score`") from None
    except json.JSONDecodeError as err:
        raise InputError(storage.join(scores_url, RUN_RECORD), f"not valid JSON ({err})") from None


def read_case_info(url: str, storage_options: StorageOptions = None) -> tuple[pa.Table, list[str]]:
    """A case-info CSV or Parquet as (table, its CASE_INFO_COLUMNS present): `case_id` and those columns, strings
    but `ga_weeks` (float64); other columns ignored. One-line `InputError`s: no case_id, a duplicate case_id, a
    ga_weeks that is not a number, a date not starting YYYY-MM."""
    fs, path = storage.filesystem(url, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise InputError(url, "case-info file not found") from None
    try:
        if path.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        else:  # every column as text: ids such as 007 keep their zeros
            # the header from the first block only (the streaming reader), then one parse with every column as text
            names = pacsv.open_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(block_size=1 << 20)).schema.names
            table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=True))
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(url, f"not a readable CSV or Parquet case-info ({' '.join(str(err).split())})") from None
    if "case_id" not in table.column_names:
        raise InputError(url, f"no case_id column (columns: {', '.join(table.column_names)})")
    present = [c for c in CASE_INFO_COLUMNS if c in table.column_names]
    columns = {"case_id": _as_text(table["case_id"])}
    for column in present:
        if column == "ga_weeks":
            try:
                columns[column] = table[column].cast(pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise InputError(url, "ga_weeks holds values that are not numbers (weeks, e.g. 32.5)") from None
        else:
            columns[column] = _as_text(table[column])
    info = pa.table(columns)
    ids = info["case_id"].to_pylist()
    if None in ids or len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1} - {None})[:3] if len(ids) < 200_000 else []
        raise InputError(url, "case_id is empty or repeated" + (f" ({', '.join(repeated)})" if repeated else ""))
    if "date" in present:
        bad = [d for d in info["date"].to_pylist() if d is not None and not _is_month_prefixed(d)]
        if bad:
            raise InputError(url, f"date {bad[0]!r} is not a date written YYYY-MM-DD or YYYY-MM")
    return info, present


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return column if pa.types.is_string(column.type) else column.cast(pa.string())


def _is_month_prefixed(text: str) -> bool:
    return len(text) >= 7 and text[:4].isdigit() and text[4] == "-" and text[5:7].isdigit() and "01" <= text[5:7] <= "12"


# ---------------------------------------------------------------------------------------------- summary


def summarise_run(scores_url: str, case_info_url: str | None = None, storage_options: StorageOptions = None,
                  gallery_cap: int = GALLERY_RESCAN_CAP, sample: int = GALLERY_USABLE_SAMPLE, seed: int = 0,
                  min_cases_to_rank: int = MIN_CASES_TO_RANK) -> dict:
    """summary.json's content: every figure of the morning report of the scoring output at `scores_url`."""
    return _summarise(RunTables(scores_url, case_info_url, storage_options), case_info_url, gallery_cap, sample,
                      seed, min_cases_to_rank)


def _summarise(tables: RunTables, case_info_url: str | None, gallery_cap: int, sample: int, seed: int,
               min_cases_to_rank: int) -> dict:
    run = tables.run
    seg = run.get("task") == "seg" or (run.get("task") is None and bool(
        tables.query("SELECT count(ac_mm) FROM c")[0][0]))
    return {
        "report": {"scores": public_url(tables.scores_url),
                   "case_info": public_url(case_info_url) if case_info_url else None,
                   "case_info_columns": tables.case_info_columns, "written_at": _now(), "fetaliqa": __version__,
                   "derived_columns": tables.derived, "min_cases_to_rank": min_cases_to_rank,
                   "context_columns": [c for c in CONTEXT_COLUMNS if c in tables.cases_columns]},
        "run": _run_section(run),
        "output": _output_counts(tables),
        "errors": _errors(tables),
        "decisions": _decisions(tables, min_cases_to_rank),
        "sweep_coverage": _sweep_coverage(tables),
        "distributions": _distributions(tables, seg),
        "ac": _ac(tables) if seg else None,
        "gallery": _gallery(tables, gallery_cap, sample, seed),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _run_section(run: dict) -> dict:
    keys = ("run_id", "status", "started", "ended", "seconds", "input", "checkpoint", "checkpoint_id", "model",
            "task", "versions", "cases", "frames", "frames_per_s", "positives", "parts", "notes", "pseudonymized",
            "pseudonym_key_id")
    history = [{k: earlier.get(k) for k in ("run_id", "status", "started", "ended", "cases", "frames", "frames_per_s")}
               for earlier in run.get("history", [])]
    return {**{k: run.get(k) for k in keys}, "history": history}


def _output_counts(tables: RunTables) -> dict:
    cases, frames, positives = tables.query("SELECT count(*), coalesce(sum(frames), 0), coalesce(sum(positives), 0) "
                                            "FROM c")[0]
    failed, error_rows = tables.query("SELECT count(DISTINCT case_id), count(*) FROM errors")[0]
    return {"cases": cases, "frames": int(frames), "positive_frames": int(positives), "failed_cases": failed,
            "error_rows": error_rows, "case_files": len(tables.case_files)}


def _errors(tables: RunTables) -> list[dict]:
    rows = tables.query("SELECT error, count(*) AS n, list_slice(list(message ORDER BY case_id, message), 1, 3) "
                        "FROM errors GROUP BY error ORDER BY n DESC, error")
    return [{"error": kind, "rows": n, "examples": examples} for kind, n, examples in rows]


def _decisions(tables: RunTables, min_cases_to_rank: int) -> dict:
    n, usable = tables.query("SELECT count(*), count(*) FILTER (decision = 'usable') FROM c")[0]
    by = {}
    for dimension in ("site", "device", "month"):
        rows = tables.query(f"SELECT {dimension}, count(*), count(*) FILTER (decision = 'usable') FROM c "
                            f"WHERE {dimension} IS NOT NULL GROUP BY 1 ORDER BY 1")
        unknown = n - sum(r[1] for r in rows)
        groups = [{"value": value, **share(k, total)} for value, total, k in rows]
        if dimension == "site":  # worst first; a tie goes to the site with more cases (the surer estimate)
            groups.sort(key=lambda g: (g["cases"] < min_cases_to_rank, g["share"], -g["cases"], g["value"]))
            rank = 0
            for group in groups:
                rank += group["cases"] >= min_cases_to_rank
                group["rank"] = rank if group["cases"] >= min_cases_to_rank else None
        by[dimension] = {"groups": groups[:MAX_TABLE_ROWS], "groups_total": len(groups), "unknown_cases": unknown}
    by["site"]["ranked"] = sum(g["rank"] is not None for g in by["site"]["groups"])
    by["site"]["from"] = _site_source(tables)
    by["device"]["from"] = ("case-info device, else DICOM Manufacturer and ManufacturerModelName"
                            if "device" in tables.case_info_columns else "DICOM Manufacturer and ManufacturerModelName")
    by["month"]["from"] = ("case-info date, else DICOM StudyDate" if "date" in tables.case_info_columns
                           else "DICOM StudyDate")
    return {"overall": share(usable, n), "rescan": n - usable, **by}


def _site_source(tables: RunTables) -> str:
    return ("case-info site, else DICOM InstitutionName" if "site" in tables.case_info_columns
            else "DICOM InstitutionName (no case-info site)")


def _sweep_coverage(tables: RunTables) -> list[dict]:
    sweeps = range(1, layout.SWEEPS_PER_CASE + 1)
    columns = ", ".join(f"count(*) FILTER (sweeps >= {k}), count(*) FILTER (list_contains(usable_sweeps, {k}))"
                        for k in sweeps)
    counts = tables.query(f"SELECT {columns} FROM c")[0]
    return [{"sweep": k, **share(counts[2 * i + 1], counts[2 * i])} for i, k in enumerate(sweeps)]


def _distributions(tables: RunTables, seg: bool) -> dict:
    top, below, above = tables.query("SELECT max(best_score), max(best_score) FILTER (decision = 'rescan'), "
                                     "min(best_score) FILTER (decision = 'usable') FROM c")[0]
    # CLS scores are probabilities; SEG's are mask area fractions, mostly far below 1: scale to the highest
    high = 1.0 if not seg else max(0.05, math.ceil((top or 0) * 20) / 20)
    score_edges = [round(high * i / 20, 6) for i in range(21)]
    most = tables.query("SELECT max(positives) FROM c WHERE decision = 'usable'")[0][0] or 1
    width = max(1, math.ceil(most / 20))
    frame_edges = list(range(1, most + width + 1, width))
    return {"best_score": {"edges": score_edges, "counts": _counts(tables, "best_score", score_edges, "true"),
                           "threshold_between": [_float32(below), _float32(above)]},
            "usable_frames": {"edges": frame_edges,
                              "counts": _counts(tables, "positives", frame_edges, "decision = 'usable'")}}


def _float32(value: float | None) -> float | None:
    """A float32 column's value as the shortest decimal that is the same float32 (0.257, not 0.25699999928)."""
    return None if value is None else float(np.format_float_positional(np.float32(value)))


def _counts(tables: RunTables, column: str, edges: list[float], where: str) -> list[int]:
    """How many cases have `column` in [edges[i], edges[i + 1]), the last bin closed; cases outside are left out."""
    bins = len(edges) - 1
    width = (edges[-1] - edges[0]) / bins
    rows = dict(tables.query(f"SELECT least(floor(({column} - ?) / ?)::INTEGER, ?) AS b, count(*) FROM c "
                             f"WHERE {where} AND {column} >= ? AND {column} <= ? GROUP BY b",
                             [edges[0], width, bins - 1, edges[0], edges[-1]]))
    return [rows.get(i, 0) for i in range(bins)]


def _ac(tables: RunTables) -> dict:
    """AC of the usable cases that have one: distribution, Hadlock's GA, INTERGROWTH-21st centiles where GA known."""
    rows = tables.con.sql("SELECT case_id, ac_mm, ga_weeks, best_sweep, best_frame FROM c "
                              "WHERE decision = 'usable' AND ac_mm IS NOT NULL ORDER BY case_id").to_arrow_table()
    ids, sweep, frame = (rows[name].to_pylist() for name in ("case_id", "best_sweep", "best_frame"))
    # (N,) float64, NaN where null
    ac, ga = (rows[name].cast(pa.float64()).to_numpy(zero_copy_only=False) for name in ("ac_mm", "ga_weeks"))
    hadlock = np.asarray(growth.hadlock_ga_weeks(ac), np.float64)
    z = np.asarray(growth.ac_z_score(ac, ga), np.float64)
    centile = np.asarray(growth.ac_centile(ac, ga), np.float64)
    usable_without = tables.query("SELECT count(*) FROM c WHERE decision = 'usable' AND ac_mm IS NULL")[0][0]
    known = ~np.isnan(centile)
    flagged = []
    for name, mask, order in (("below_10th", known & (centile < 10), 1), ("above_90th", known & (centile > 90), -1)):
        picked = np.flatnonzero(mask)
        picked = picked[np.argsort(order * centile[picked], kind="stable")]
        flagged.append((name, [{"case_id": ids[i], "sweep": int(sweep[i]), "frame": int(frame[i]),
                                "ac_mm": round(float(ac[i]), 1), "ga_weeks": float(ga[i]),
                                "z": round(float(z[i]), 2), "centile": round(float(centile[i]), 1)} for i in picked]))
    edges = [float(e) for e in np.arange(0, max(400, 20 * math.ceil(np.nanmax(ac, initial=0) / 20)) + 1, 20)]
    ga_edges = [float(e) for e in range(14, 43)]
    return {"cases": int(ac.size), "usable_without_ac": usable_without,
            "ac_mm": _stats(ac), "ac_histogram": {"edges": edges, "counts": _histogram(ac, edges)},
            "hadlock_ga_weeks": {**_stats(hadlock), "outside_range": int(np.isnan(hadlock).sum()),
                                 "ac_range_mm": [round(v, 1) for v in growth.HADLOCK_AC_RANGE_MM],
                                 "histogram": {"edges": ga_edges, "counts": _histogram(hadlock, ga_edges)}},
            "with_ga": int((~np.isnan(ga)).sum()), "with_centile": int(known.sum()),
            "z": _stats(z), **{f"{name}_count": len(rows) for name, rows in flagged},
            "below_10th_share": share(len(flagged[0][1]), int(known.sum())),
            "above_90th_share": share(len(flagged[1][1]), int(known.sum())),
            **{name: rows[:MAX_AC_LISTED] for name, rows in flagged},
            "citations": dict(growth.CITATIONS), "_all_flagged": flagged}


def _stats(values: np.ndarray) -> dict:
    """n, mean, median, 10th and 90th percentile of the non-NaN values (None when there are none), to 0.01."""
    finite = values[~np.isnan(values)]
    if not finite.size:
        return {"n": 0, "mean": None, "median": None, "p10": None, "p90": None}
    return {"n": int(finite.size), "mean": round(float(finite.mean()), 2), "median": round(float(np.median(finite)), 2),
            "p10": round(float(np.percentile(finite, 10)), 2), "p90": round(float(np.percentile(finite, 90)), 2)}


def _histogram(values: np.ndarray, edges: list[float]) -> list[int]:
    return [int(c) for c in np.histogram(values[~np.isnan(values)], bins=edges)[0]]


def _gallery(tables: RunTables, cap: int, sample: int, seed: int) -> dict:
    """The rescan cases nearest the threshold first (up to `cap`), and `sample` usable cases drawn by a seeded hash."""
    columns = "case_id, decision, best_sweep, best_frame, best_score, ac_mm"
    rescan = tables.query(f"SELECT {columns} FROM c WHERE decision = 'rescan' "
                          "ORDER BY best_score DESC, case_id LIMIT ?", [cap])
    # md5 of seed and id: the same sample on every machine and DuckDB version, for one seed
    usable = tables.query(f"SELECT * FROM (SELECT {columns} FROM c WHERE decision = 'usable' "
                          "ORDER BY md5(? || '/' || case_id) LIMIT ?) ORDER BY case_id", [str(seed), sample])
    has_images = "best_frame_image" in tables.cases_columns
    items = []
    for kind, rows in (("rescan", rescan), ("usable", usable)):
        for i, (case_id, decision, sweep, frame, score, ac) in enumerate(rows):
            items.append({"case_id": case_id, "decision": decision, "sweep": sweep, "frame": frame,
                          "score": _float32(score), "ac_mm": None if ac is None else round(float(ac), 1),
                          "image": f"gallery/{kind}-{i:03d}-{safe_name(case_id)[:80]}.jpg" if has_images else None})
    return {"rescan_cap": cap, "rescan_shown": len(rescan), "usable_sample": sample, "usable_shown": len(usable),
            "seed": seed, "images": has_images, "items": items}


# ---------------------------------------------------------------------------------------------- writing


def write_run_report(scores_url: str, output_url: str, case_info_url: str | None = None,
                     storage_options: StorageOptions = None, gallery_cap: int = GALLERY_RESCAN_CAP,
                     sample: int = GALLERY_USABLE_SAMPLE, seed: int = 0,
                     min_cases_to_rank: int = MIN_CASES_TO_RANK) -> dict:
    """Write report.html, summary.json, rescan.csv, the gallery's JPEGs and the plots under `output_url`; return
    the summary."""
    tables = RunTables(scores_url, case_info_url, storage_options)
    summary = _summarise(tables, case_info_url, gallery_cap, sample, seed, min_cases_to_rank)
    flagged = summary["ac"].pop("_all_flagged") if summary["ac"] else None
    fs, root = storage.filesystem(output_url, storage_options)
    fs.makedirs(root, exist_ok=True)
    files = {"rescan.csv": _rescan_csv(tables), **_gallery_images(tables, summary["gallery"]),
             **_plots(summary)}
    if flagged is not None:
        files["ac_outliers.csv"] = _outliers_csv(flagged)
    summary["files"] = sorted(name for name in files if not name.startswith("gallery/"))
    files["summary.json"] = json.dumps(summary, indent=1, allow_nan=False).encode()
    files["report.html"] = render_run_report(summary).encode()
    if storage.is_local(output_url):
        fs.makedirs(f"{root}/gallery", exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(f"{root}/{name}", data)
    return summary


def _rescan_csv(tables: RunTables) -> bytes:
    columns = ", ".join("array_to_string(usable_sweeps, ' ') AS usable_sweeps" if c == "usable_sweeps" else
                        f"info_{c} AS {c}" if c in ("site", "device", "date") else c for c in RESCAN_COLUMNS)
    table = tables.con.sql(f"SELECT {columns} FROM c WHERE decision = 'rescan' ORDER BY case_id").to_arrow_table()
    sink = io.BytesIO()
    pacsv.write_csv(table, sink)
    return sink.getvalue()


def _gallery_images(tables: RunTables, gallery: dict) -> dict[str, bytes]:
    """{gallery item's image path: its JPEG}, read only from the files that hold the gallery's cases."""
    wanted = {item["case_id"]: item["image"] for item in gallery["items"] if item["image"]}
    if not wanted:
        return {}
    files = [row[0] for row in tables.query("SELECT DISTINCT filename FROM cases_raw WHERE case_id IN "
                                            "(SELECT unnest(?))", [list(wanted)])]
    rows = tables.query("SELECT case_id, best_frame_image FROM read_parquet(?) WHERE case_id IN (SELECT unnest(?))",
                        [files, list(wanted)])
    images = {wanted[case_id]: bytes(image) for case_id, image in rows if image is not None}
    for item in gallery["items"]:
        if item["image"] not in images:
            item["image"] = None  # the run stored no image for it
    return images


def _plots(summary: dict) -> dict[str, bytes]:
    distributions, coverage = summary["distributions"], summary["sweep_coverage"]
    score = distributions["best_score"]
    low, high = score["threshold_between"]
    marker = None if low is None and high is None else (high if high is not None else low, "threshold")
    plotted = {
        "best_scores.png": plots.histogram_png(score["edges"], score["counts"], "best score of the case",
                                               "Best frame score per case", marker),
        "usable_frames.png": plots.histogram_png(distributions["usable_frames"]["edges"],
                                                 distributions["usable_frames"]["counts"],
                                                 "usable frames (score at or above the threshold)",
                                                 "Usable frames per usable case"),
        "sweep_coverage.png": plots.shares_png([str(s["sweep"]) for s in coverage],
                                               [s["share"] or 0 for s in coverage],
                                               [s["ci95"][0] or 0 for s in coverage],
                                               [s["ci95"][1] or 0 for s in coverage], "sweep",
                                               "Share of cases whose sweep held a usable frame (95% Wilson)")}
    ac = summary["ac"]
    if ac and ac["cases"]:
        plotted["ac.png"] = plots.histogram_png(ac["ac_histogram"]["edges"], ac["ac_histogram"]["counts"],
                                                "AC (mm)", "Abdominal circumference of the usable cases")
        plotted["ga_hadlock.png"] = plots.histogram_png(
            ac["hadlock_ga_weeks"]["histogram"]["edges"], ac["hadlock_ga_weeks"]["histogram"]["counts"],
            "gestational age implied by AC (weeks, Hadlock 1984)", "Gestational age from AC alone")
    return plotted


def _outliers_csv(flagged: list[tuple[str, list[dict]]]) -> bytes:
    rows = [{"flag": name, **row} for name, listed in flagged for row in listed]
    table = pa.Table.from_pylist(rows) if rows else pa.table(
        {c: pa.array([], pa.string()) for c in ("flag", "case_id", "sweep", "frame", "ac_mm", "ga_weeks", "z", "centile")})
    sink = io.BytesIO()
    pacsv.write_csv(table, sink)
    return sink.getvalue()

