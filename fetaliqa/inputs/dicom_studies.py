"""Group the DICOM files of a listing into studies (cases) from their headers, before any pixel is read.

A case is a study: `case_id` = StudyInstanceUID (a valid UID: `fetaliqa.inputs.dicom.is_valid_uid`); its sweeps are its
multi-frame instances in `InstanceHeader.sort_key` order (SeriesNumber, InstanceNumber, acquisition time).
Headers are read in a pool of `HEADER_THREADS` threads on the driver, each stopping before the pixel data (one
or two ranged GETs an object): header reads are I/O-bound, and ~1 ms of parsing each puts 10^5 files at a
couple of minutes of one core. The listing holds headers only, never pixel data, and its threads share no
process-global state (`fetaliqa.inputs.dicom` finds truncation without catching warnings).

What cannot be a sweep does not stop the listing:
- a file named DICOMDIR (any case), or whose header says Media Storage Directory Storage, is skipped with a
  note: a file-set index, not an image (a PACS export holds one per file set, all named alike);
- a file that is not DICOM, whose header is bad, whose StudyInstanceUID is not a UID (`bad_uid`) or whose
  decoded size is over the limit (`too_large`) becomes an error row keyed by its URI (`case_id` = `source` =
  the URI: file names repeat in every folder of an export, so only the URI tells two files apart);
- a single-frame instance is skipped with a note; a study with no multi-frame instance becomes a
  `study_failed` error row.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fetaliqa.errors import DicomDirectoryError, InputError, StudyFailedError
from fetaliqa.inputs.dicom import InstanceHeader, is_dicomdir_name, read_dicom_header
from fetaliqa.inputs.storage import StorageOptions

HEADER_THREADS = 32


@dataclass(frozen=True)
class ListedRow:
    """One row of the listing: a study (``instances`` its sweep URIs in order), or a file or study that
    already failed (``error`` its kind, ``message`` one line; a file's ``case_id`` is its URI)."""

    case_id: str
    source: str
    instances: tuple[str, ...] | None = None
    error: str = ""
    message: str = ""


def list_dicom_studies(uris: list[str], storage_options: StorageOptions = None,
                       max_instance_bytes: int | None = None) -> tuple[list[ListedRow], list[str]]:
    """Read the headers of `uris` and group them into studies: (rows, notes), rows in no particular order.

    A study's `source` is the URI of its first sweep. An instance whose decoded size (from its header) is over
    `max_instance_bytes` (None: no limit) is a `too_large` row and no sweep of its study. Notes are one line
    each (DICOMDIRs and single-frame instances skipped), in the order of `uris`.
    """
    def header_or_row(uri: str) -> InstanceHeader | ListedRow | str:
        """The instance's header, its error row, or a note (a DICOMDIR)."""
        try:
            header = read_dicom_header(uri, storage_options)
            header.check_size(max_instance_bytes)
            return header
        except DicomDirectoryError:
            return _dicomdir_note(uri)
        except InputError as err:
            return ListedRow(uri, uri, error=err.kind, message=str(err))

    named_dicomdir = [is_dicomdir_name(posixpath.basename(uri.rstrip("/"))) for uri in uris]
    notes = [_dicomdir_note(uri) for uri, skip in zip(uris, named_dicomdir) if skip]
    with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
        results = list(pool.map(header_or_row, (uri for uri, skip in zip(uris, named_dicomdir) if not skip)))
    notes += [r for r in results if isinstance(r, str)]
    rows = [r for r in results if isinstance(r, ListedRow)]
    studies: dict[str, list[InstanceHeader]] = defaultdict(list)
    for header in results:
        if isinstance(header, InstanceHeader):
            studies[header.study_uid].append(header)
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


def _dicomdir_note(uri: str) -> str:
    return f"{uri}: DICOMDIR skipped (a file-set index, not an image)"
