"""Facts of the ACOUSLIC-AI archive layout, shared by the reader, the synthetic generator and the jobs.

```
<root>/images/stacked_fetal_ultrasound/<uuid>.mha   T x H x W uint8 (T = 6 sweeps x K frames)
<root>/masks/stacked_fetal_abdomen/<uuid>.mha       same shape; 0 background, 1 optimal, 2 suboptimal
<root>/circumferences/fetal_abdominal_circumferences_per_sweep.csv
```
"""

from __future__ import annotations

import posixpath
from urllib.parse import urlsplit

IMAGES_DIR = "images/stacked_fetal_ultrasound"
MASKS_DIR = "masks/stacked_fetal_abdomen"
CIRCUMFERENCES_CSV = "circumferences/fetal_abdominal_circumferences_per_sweep.csv"
CSV_COLUMNS = ("uuid", "subject_id") + tuple(f"sweep_{i}_ac_mm" for i in range(1, 7))

SWEEPS_PER_CASE = 6
# Suffixes SimpleITK reads for stacked volumes; the longest first so ".nii.gz" wins over ".gz".
IMAGE_SUFFIXES = (".nii.gz", ".mha", ".mhd", ".nii", ".nrrd")

MASK_BACKGROUND, MASK_OPTIMAL, MASK_SUBOPTIMAL = 0, 1, 2


def sweep_of_frame(frame: int, n_frames: int) -> int:
    """0-based sweep index of a 0-based frame index in a stack of `n_frames` frames."""
    return frame // (n_frames // SWEEPS_PER_CASE)


def url_path(uri: str) -> str:
    """The path of `uri`: a URL's without its query string or fragment (a presigned
    `https://host/bucket/case.mha?X-Amz-Signature=...` -> `/bucket/case.mha`); a local path as it is."""
    return urlsplit(uri).path if "://" in uri else uri


def image_suffix(uri: str) -> str | None:
    """The recognised image suffix of `uri`'s path (lower-cased), or None."""
    lower = url_path(uri).lower()
    return next((s for s in IMAGE_SUFFIXES if lower.endswith(s)), None)


def case_id_of(uri: str) -> str:
    """Case id of an image URI: the file name of its path without the image suffix."""
    name = posixpath.basename(url_path(uri).rstrip("/"))
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name
