"""Group the DICOM files of a listing into studies (cases) from their headers, before any pixel is read.

A case is a study: `case_id` = StudyInstanceUID; its sweeps are its multi-frame instances in
`InstanceHeader.sort_key` order (SeriesNumber, InstanceNumber, acquisition time). Headers are read in a pool
of `HEADER_THREADS` threads on the driver, each stopping before the pixel data (one or two ranged GETs an
object): header reads are I/O-bound, and ~1 ms of parsing each puts 10^5 files at a couple of minutes of
one core. The listing holds headers only, never pixel data.

What cannot be a sweep does not stop the listing: a file that is not DICOM or whose header is bad becomes an
error row (one per file); a single-frame instance is skipped with a note; a study with no multi-frame
instance becomes a `study_failed` error row.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fetaliqa.dicom import InstanceHeader, read_dicom_header
from fetaliqa.errors import InputError, StudyFailedError
from fetaliqa.storage import StorageOptions

HEADER_THREADS = 32


@dataclass(frozen=True)
class ListedRow:
    """One row of the listing: a study (``instances`` its sweep URIs in order), or a file or study that
    already failed (``error`` its kind, ``message`` one line)."""

    case_id: str
    source: str
    instances: tuple[str, ...] | None = None
    error: str = ""
    message: str = ""


def list_dicom_studies(uris: list[str], storage_options: StorageOptions = None) -> tuple[list[ListedRow], list[str]]:
    """Read the headers of `uris` and group them into studies: (rows, notes), rows in no particular order.

    A study's `source` is the URI of its first sweep. Notes are one line each (single-frame instances skipped).
    """
    def header_or_error(uri: str) -> InstanceHeader | ListedRow:
        try:
            return read_dicom_header(uri, storage_options)
        except InputError as err:
            return ListedRow(posixpath.basename(uri.rstrip("/")), uri, error=err.kind, message=str(err))

    with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
        results = list(pool.map(header_or_error, uris))
    rows = [r for r in results if isinstance(r, ListedRow)]
    studies: dict[str, list[InstanceHeader]] = defaultdict(list)
    for header in results:
        if isinstance(header, InstanceHeader):
            studies[header.study_uid].append(header)
    notes = []
    for study_uid, headers in studies.items():
        sweeps = sorted((h for h in headers if h.frames > 1), key=InstanceHeader.sort_key)
        singles = sorted((h for h in headers if h.frames <= 1), key=InstanceHeader.sort_key)
        notes += [f"{h.source}: single-frame instance of study {study_uid} skipped (not a sweep)" for h in singles]
        if sweeps:
            rows.append(ListedRow(study_uid, sweeps[0].source, tuple(h.source for h in sweeps)))
        else:
            err = StudyFailedError(singles[0].source, f"study {study_uid} has no multi-frame instance "
                                                      f"({len(singles)} single-frame instance(s) skipped)")
            rows.append(ListedRow(study_uid, singles[0].source, error=err.kind, message=str(err)))
    return rows, notes
