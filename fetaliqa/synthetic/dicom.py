"""The synthetic archive of `fetaliqa.synthetic.archive` written as DICOM studies, as screening archives hold sweeps.

Each case becomes one study (StudyInstanceUID = ``2.25.<the case uuid as an integer>``, `study_uid_of`) of
six US Multi-frame instances, one per sweep, in one series (SeriesNumber 1, InstanceNumber = sweep,
AcquisitionDateTime a minute apart). Studies come from a few fictional sites, stations and devices and are
spread over several months (`study_context`), so that a report has sites, devices and months to group by. Each
stored frame is the case's ``H x W`` frame placed inside a larger canvas: a banner of burned-in text above it
and a gray-level bar to its right, as scanners burn them in.
The Sequence of Ultrasound Regions names the ``H x W`` frame as the one 2-D B-mode region, with
PhysicalDeltaX/Y of 0.028 cm; a reader that crops to it gets the case's frames back exactly (every
encoding here is lossless). Sweeps cycle through `SWEEP_ENCODINGS`, so a study mixes transfer syntaxes and
photometric interpretations.

Layout under the output root, the labels beside the DICOM in the ACOUSLIC layout keyed by StudyInstanceUID:
```
<root>/dicom/<SOPInstanceUID>.dcm                   one file per sweep, all studies in one folder
<root>/masks/stacked_fetal_abdomen/<study>.mha      (T, H, W) uint8 in {0, 1, 2}: the cropped region's mask
<root>/circumferences/fetal_abdominal_circumferences_per_sweep.csv   uuid = StudyInstanceUID
```
"""

from __future__ import annotations

import datetime
import io
import posixpath
import tempfile
import uuid

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
)

from fetaliqa.inputs import layout
from fetaliqa.inputs.storage import StorageOptions, filesystem, is_local, put_object
from fetaliqa.synthetic.archive import SPACING_MM, SyntheticCase, put_csv, put_volume, synthetic_cases

DICOM_DIR = "dicom"
# (transfer syntax, photometric interpretation) of sweeps 1, 2, 3, then again for 4, 5, 6.
SWEEP_ENCODINGS = (
    (JPEGLSLossless, "MONOCHROME2"),
    (RLELossless, "RGB"),
    (DeflatedExplicitVRLittleEndian, "MONOCHROME2"),
)
BANNER_ROWS, MARGIN, BAR_COLUMNS = 20, 4, 10  # canvas around the region: text above, a bar to the right
TEXT_GRAY, TEXT_RGB = 230, (255, 220, 0)  # burned-in text: near white in gray, yellow in colour
# (InstitutionName, StationName, Manufacturer, ManufacturerModelName) of the scanners studies come from, all
# fictional: three sites, one with two stations, two device models.
SCANNERS = (
    ("Synthetic North Clinic", "NORTH-US1", "Fetaliqa Synthetic", "Sweep 300"),
    ("Synthetic South Hospital", "SOUTH-US1", "Fetaliqa Synthetic", "Sweep 500"),
    ("Synthetic North Clinic", "NORTH-US2", "Fetaliqa Synthetic", "Sweep 500"),
    ("Synthetic East Centre", "EAST-US1", "Fetaliqa Synthetic", "Sweep 300"),
)
FIRST_STUDY_DATE = datetime.date(2025, 1, 6)
STUDY_DAYS_APART = 41  # studies 1, 2, 3, ... fall in successive months, over a year


def study_uid_of(case_id: str) -> str:
    """The StudyInstanceUID of a synthetic case: its uuid as a ``2.25`` UID (PS3.5 B.2)."""
    return f"2.25.{uuid.UUID(case_id).int}"


def _instance_uid(case_id: str, name: str) -> str:
    return f"2.25.{uuid.uuid5(uuid.UUID(case_id), name).int}"


def study_context(number: int) -> dict[str, str]:
    """The header context of the `number`-th (1-based) case's study: StudyDate (YYYYMMDD), InstitutionName,
    StationName, Manufacturer, ManufacturerModelName; the scanners in turn, dates `STUDY_DAYS_APART` apart
    within a year."""
    institution, station, manufacturer, model = SCANNERS[(number - 1) % len(SCANNERS)]
    date = FIRST_STUDY_DATE + datetime.timedelta(days=(number - 1) * STUDY_DAYS_APART % 365)
    return {"StudyDate": date.strftime("%Y%m%d"), "InstitutionName": institution, "StationName": station,
            "Manufacturer": manufacturer, "ManufacturerModelName": model}


def region_box(height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)``, half-open, of the ``height x width`` imaging region in a stored frame."""
    return BANNER_ROWS, MARGIN, BANNER_ROWS + height, MARGIN + width


def write_synthetic_dicom_archive(
    out_url: str,
    cases: int,
    frames_per_sweep: int = 140,
    height: int = 562,
    width: int = 744,
    seed: int = 0,
    storage_options: StorageOptions = None,
) -> list[str]:
    """Write the cases `fetaliqa.synthetic.archive.write_synthetic_archive` writes for the same arguments, as DICOM
    studies with their labels (layout in the module docstring); return the StudyInstanceUIDs in case order.
    """
    fs, root = filesystem(out_url, storage_options)
    local = is_local(out_url)
    rows, studies = [], []
    with tempfile.TemporaryDirectory(prefix="fetaliqa-synth-") as tmp:
        for number, case in enumerate(synthetic_cases(cases, frames_per_sweep, height, width, seed), start=1):
            study = study_uid_of(case.case_id)
            for sweep in range(1, layout.SWEEPS_PER_CASE + 1):
                sop_uid, data = encode_sweep(case, number, sweep, frames_per_sweep)
                put_object(fs, posixpath.join(root, DICOM_DIR, f"{sop_uid}.dcm"), data, local)
            put_volume(fs, posixpath.join(root, layout.MASKS_DIR, f"{study}.mha"), case.mask, tmp, local)
            rows.append(case.csv_row(study))
            studies.append(study)
        put_csv(fs, posixpath.join(root, layout.CIRCUMFERENCES_CSV), rows, local)
    return studies


def encode_sweep(case: SyntheticCase, number: int, sweep: int, frames_per_sweep: int) -> tuple[str, bytes]:
    """One sweep (1-based) of `case` as a DICOM file: (SOPInstanceUID, the file's bytes)."""
    syntax, photometric = SWEEP_ENCODINGS[(sweep - 1) % len(SWEEP_ENCODINGS)]
    frames = case.image[(sweep - 1) * frames_per_sweep: sweep * frames_per_sweep]
    text = f"FETALIQA SYNTH {number:04d} SWEEP {sweep} MI 0.9 TIS 0.2"
    canvas = burn_in(frames, text, colour=photometric == "RGB")
    ds = instance_dataset(case, number, sweep, canvas, photometric)
    if syntax.is_encapsulated:
        ds.compress(syntax, canvas, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = canvas.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return str(ds.SOPInstanceUID), buffer.getvalue()


def burn_in(frames: np.ndarray, text: str, colour: bool) -> np.ndarray:
    """``(K, H, W)`` uint8 -> the stored frames ``(K, H + BANNER_ROWS + MARGIN, W + 2 MARGIN + BAR_COLUMNS)``
    uint8 (``(..., 3)`` RGB when `colour`, gray copied to every channel): `text` in the banner above the frame,
    a gray-level bar (255 at the top to 0 at the bottom) right of it, 0 elsewhere outside `region_box`."""
    k, height, width = frames.shape
    top, left, bottom, right = region_box(height, width)
    shape = (bottom + MARGIN, right + MARGIN + BAR_COLUMNS)
    template = np.zeros(shape + ((3,) if colour else ()), np.uint8)
    cv2.putText(template, text, (MARGIN, BANNER_ROWS - 6), cv2.FONT_HERSHEY_PLAIN, 0.8,
                TEXT_RGB if colour else TEXT_GRAY, 1, cv2.LINE_AA)
    template[:, right:, ...] = 0  # the text stops at the bar's side: it never reaches past the banner
    bar = np.linspace(255, 0, bottom - top).round().astype(np.uint8)[:, None]
    template[top:bottom, right + MARGIN:, ...] = bar[..., None] if colour else bar
    canvas = np.repeat(template[None], k, axis=0)
    canvas[:, top:bottom, left:right, ...] = frames[..., None] if colour else frames
    return canvas


def instance_dataset(case: SyntheticCase, number: int, sweep: int, canvas: np.ndarray, photometric: str) -> Dataset:
    """The header of sweep `sweep` of the `number`-th case (both 1-based), its pixel data to be set."""
    study = study_uid_of(case.case_id)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = _instance_uid(case.case_id, f"sweep-{sweep}")
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, _instance_uid(case.case_id, "series")
    ds.Modality, ds.PatientID, ds.PatientName = "US", case.subject_id, "SYNTHETIC^CASE"
    for keyword, value in study_context(number).items():
        setattr(ds, keyword, value)
    ds.SeriesNumber, ds.InstanceNumber = 1, sweep
    ds.AcquisitionDateTime = f"{ds.StudyDate}09{sweep:02d}00"
    ds.BurnedInAnnotation = "YES"
    ds.Rows, ds.Columns = canvas.shape[1], canvas.shape[2]
    ds.NumberOfFrames = canvas.shape[0]
    ds.FrameTime = 50.0  # ms; with FrameIncrementPointer, what a US multi-frame instance states
    ds.FrameIncrementPointer = 0x00181063
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    top, left, bottom, right = region_box(canvas.shape[1] - BANNER_ROWS - MARGIN,
                                          canvas.shape[2] - 2 * MARGIN - BAR_COLUMNS)
    region = Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0  # 2-D, tissue (B-mode)
    region.RegionLocationMinX0, region.RegionLocationMinY0 = left, top
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = right - 1, bottom - 1  # inclusive
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = SPACING_MM / 10.0
    region.ReferencePixelX0, region.ReferencePixelY0 = (right - left) // 2, 0
    ds.SequenceOfUltrasoundRegions = Sequence([region])
    return ds

