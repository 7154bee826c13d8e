"""Keyed pseudonyms of the identifiers a scoring run writes (`score --pseudonymize-key-file`).

The pseudonym of an identifier text ``x`` is ``"p" + HMAC-SHA256(key, x)`` in hex, cut to 32 digits (128 bits):
the same key gives the same pseudonym in every run, so reruns resume and reports join; without the key it can
be neither reversed nor recomputed. The key is the key file's bytes without surrounding white space, at least
`MIN_KEY_BYTES`. It is never written anywhere: `run.json` records `key_id`, an HMAC of a fixed text, which tells
the key holder which key a run used and tells nobody else anything.

What is replaced, and what is kept, follows the DICOM PS3.15 Basic Application Level Confidentiality Profile
with its Retain Device Identity and Retain Longitudinal Temporal Information (modified dates) options:
identifiers (case ids, URIs, UIDs, institution and station names) become pseudonyms, dates keep their month,
manufacturer and model are kept. `Pseudonyms` without a key leaves every text as it is, so a run without the
flag writes what it always wrote. The key holder recomputes pseudonyms with `fetaliqa pseudonym` (`jobs.pseudonym`).

Key files travel to Ray workers as `KeyFile` (where the key is, and its id), never as key bytes: task
arguments show in Ray's task specs and on its dashboard. Pure Python: no torch, no Ray.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from fetaliqa.errors import FetaliqaError
from fetaliqa.inputs import storage
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.redact import public_url

MIN_KEY_BYTES = 16
PSEUDONYM_HEX = 32
_KEY_ID_TEXT = b"fetaliqa-key-id"
KEY_ID_HEX = 12

# Identifiers found in free text (`note`, `message`, run.json notes) besides those a row names: URLs and absolute
# paths (up to white space, a quote or an angle bracket; punctuation that ends them in prose stays outside, as in
# `fetaliqa.redact`), and DICOM UIDs (at least three numeric components: "2.25.<n>", "1.2.840...").
_END = r"""(?=[)\]},;:.]*(?:[\s'"<>]|$))"""
_FREE_IDENTIFIER = (r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>]*?""" + _END
                    + r"""|(?<![^\s'"(\[=])/[^\s'"<>]*?""" + _END
                    + r"|(?<![\w.])(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*)){2,}(?![\w.])")


def pseudonym(key: bytes, text: str) -> str:
    """``"p"`` + the first 32 hex digits of HMAC-SHA256(`key`, `text` in UTF-8)."""
    return "p" + hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def key_id(key: bytes) -> str:
    """Which key, without the key: the first 12 hex digits of HMAC-SHA256(key, b"fetaliqa-key-id")."""
    return hmac.new(key, _KEY_ID_TEXT, hashlib.sha256).hexdigest()[:KEY_ID_HEX]


def load_key(url: str, storage_options: StorageOptions = None) -> bytes:
    """The key in the file at `url` (a local path or fsspec URL): its bytes without surrounding white space.
    A missing or unreadable file, or a key shorter than `MIN_KEY_BYTES`, raises a one-line error naming the
    file (never its content)."""
    fs, path = storage.filesystem(url, storage_options)
    try:
        key = fs.cat_file(path).strip()
    except Exception as err:  # noqa: BLE001 - every filesystem raises its own types
        raise storage.describe_io_error(url, err) from err
    if len(key) < MIN_KEY_BYTES:
        raise FetaliqaError(f"{public_url(url)}: pseudonymisation key of {len(key)} bytes; at least {MIN_KEY_BYTES} "
                            "are needed (e.g. `head -c 32 /dev/urandom | base64 > key`)")
    return key


class Pseudonyms:
    """What the output writes for identifiers, texts and dates: pseudonymised with a key, as they are without."""

    def __init__(self, key: bytes | None = None):
        self._key = key

    def __repr__(self) -> str:  # never the key, in a traceback or a log line
        return f"Pseudonyms(key_id={key_id(self._key)!r})" if self._key else "Pseudonyms(off)"

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def id(self, text: str | None) -> str | None:
        """An identifier (case id, URI, UID, institution, station) as written; None stays None."""
        if text is None or self._key is None:
            return text
        return pseudonym(self._key, text)

    def text(self, text: str | None, identifiers: Iterable[str | None] = ()) -> str | None:
        """Free text as written: every occurrence of `identifiers` (exactly; the longest first), and of any URL,
        absolute path or DICOM UID, replaced by its pseudonym, in one pass (a pseudonym is never replaced again).
        """
        if not text or self._key is None:
            return text
        known = sorted({i for i in identifiers if i}, key=len, reverse=True)
        pattern = "|".join([*map(re.escape, known), _FREE_IDENTIFIER])
        return re.sub(pattern, lambda match: pseudonym(self._key, match.group(0)), text)

    def date(self, iso_date: str | None) -> str | None:
        """A ``YYYY-MM-DD`` date as written: ``YYYY-MM`` with a key (the month is kept, the day is not)."""
        if iso_date is None or self._key is None:
            return iso_date
        return iso_date[:7]


# Keys loaded by this process, by (key file URL, key id): a Ray worker reads a run's key file once.
_LOADED: dict[tuple[str, str], Pseudonyms] = {}


@dataclass(frozen=True)
class KeyFile:
    """Where a run's key is, and its id: what travels to the workers that write rows (see the module docstring).

    `pseudonyms()` loads the key once per process and checks its id, so a key file changed during a run
    stops the run instead of writing pseudonyms of two keys into one output.
    """

    url: str
    key_id: str
    storage_options: StorageOptions = field(default=None, compare=False)

    def pseudonyms(self) -> Pseudonyms:
        cached = _LOADED.get((self.url, self.key_id))
        if cached is None:
            key = load_key(self.url, self.storage_options)
            if key_id(key) != self.key_id:
                raise FetaliqaError(f"{public_url(self.url)}: the pseudonymisation key changed during the run "
                                    f"(key id {key_id(key)}, the run's is {self.key_id})")
            cached = _LOADED[(self.url, self.key_id)] = Pseudonyms(key)
        return cached


def pseudonyms_of(key_file: KeyFile | None) -> Pseudonyms:
    """The `Pseudonyms` of a run: keyed by `key_file`, or none (identity) without one."""
    return Pseudonyms() if key_file is None else key_file.pseudonyms()
