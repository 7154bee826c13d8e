"""Exceptions with one-line messages that name the file and the problem.

Every error about user input derives from `InputError`, whose `kind` is the short label written to
the `error` column of a scoring run's `errors/` table and whose message reads ``<source>: <problem>``.
An `InputError` is the one choke point of every message about an input: its source and problem are
redacted (`fetaliqa.redact.redact_text`: no user info, query string or fragment of any URL in them), so
that no presigned URL's signature reaches an `errors/` row or a log line.
"""

from __future__ import annotations

from fetaliqa.redact import redact_text


class FetaliqaError(Exception):
    """Base class of every error fetaliqa raises on purpose."""


class InputError(FetaliqaError):
    """A problem with one input file or object; `str(err)` is ``"<source>: <problem>"`` on one line, redacted."""

    kind = "input"

    def __init__(self, source: str, problem: str):
        self.source = redact_text(str(source))
        self.problem = redact_text(" ".join(str(problem).split()))  # keep it on one line
        super().__init__(f"{self.source}: {self.problem}")


class MissingObjectError(InputError):
    kind = "missing"


class EmptyFileError(InputError):
    kind = "empty"


class TruncatedFileError(InputError):
    kind = "truncated"


class NotAnImageError(InputError):
    kind = "not_an_image"


class BadShapeError(InputError):
    """Wrong number of dimensions (2-D or 4-D instead of T x H x W) or wrong extent."""

    kind = "bad_shape"


class BadDtypeError(InputError):
    kind = "bad_dtype"


class BadFrameCountError(InputError):
    """T is not divisible by the number of sweeps."""

    kind = "bad_frame_count"


class MissingMaskError(InputError):
    kind = "missing_mask"


class MaskMismatchError(InputError):
    kind = "mask_shape"


class BadMaskValuesError(InputError):
    kind = "mask_values"


class MalformedCsvError(InputError):
    kind = "malformed_csv"


class BadUrlError(InputError):
    kind = "bad_url"


class CredentialsError(InputError):
    kind = "credentials"


class NotDicomError(InputError):
    """A file taken for DICOM (by its suffix or its place in a listing) without the 'DICM' marker at byte 128."""

    kind = "not_dicom"


class DicomHeaderError(InputError):
    """A DICOM file whose header cannot be parsed or lacks an attribute scoring needs (e.g. StudyInstanceUID)."""

    kind = "dicom_header"


class NoPixelDataError(InputError):
    kind = "no_pixel_data"


class UnsupportedTransferSyntaxError(InputError):
    kind = "unsupported_transfer_syntax"


class UnsupportedPhotometricError(InputError):
    kind = "unsupported_photometric"


class TooLargeError(InputError):
    """A case (for a DICOM study: one instance) whose decoded size, computed from its header, is over the run's
    limit (`--max-case-gib`): refused before a pixel is allocated, so that a corrupt or crafted header costs
    an `errors/` row, not a read worker killed for memory."""

    kind = "too_large"

    @classmethod
    def over_limit(cls, source: str, n_bytes: int, dims: str, limit_bytes: int) -> "TooLargeError":
        """The error of `n_bytes` decoded (`dims`, e.g. "800000 frames x 562 x 744 x 1 byte") over `limit_bytes`."""
        return cls(source, f"decoded size {_size_text(n_bytes)} ({dims}) over --max-case-gib {limit_bytes / 2**30:g}")


class BadUidError(InputError):
    """A DICOM UID (e.g. StudyInstanceUID) that breaks the UI rules of PS3.5 9.1: it would become a case id,
    and so a path."""

    kind = "bad_uid"


class DicomDirectoryError(InputError):
    """A DICOMDIR (Media Storage Directory Storage): the index of a file set, not an image. A listing skips it
    with a note; reading one as an instance raises this."""

    kind = "dicomdir"


class StudyFailedError(InputError):
    """Every multi-frame instance of a DICOM study failed to read (each has its own row too)."""

    kind = "study_failed"


class CheckpointError(FetaliqaError):
    """A checkpoint that is missing, corrupt, or does not fit the model it names."""


class WeightsError(FetaliqaError):
    """Pretrained weights that are missing, unreadable, or whose keys do not match the model."""


def _size_text(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB" if n_bytes >= 2**30 / 10 else f"{n_bytes / 2**20:,.1f} MiB"
