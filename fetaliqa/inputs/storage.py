"""Object storage through fsspec: any URL fsspec knows (s3://, gs://, file://, memory://) or a local path.

Credentials come from fsspec's own chain (for S3: the AWS environment variables, profiles, instance
roles) or from `storage_options`; nothing here logs them or copies them into outputs.

Retries. Every filesystem fetaliqa uses comes from `filesystem()` (the driver's listing and commit records,
read workers, write tasks), so every S3 read, write and listing gets one retry policy, `S3_RETRY_DEFAULTS`,
merged under the user's `storage_options` (the user's value wins at every key; nested dicts merge key by key):

- botocore's "standard" retry mode, `max_attempts` 5 (retries, so 6 attempts a request), on 500/502/503/504,
  throttling codes (SlowDown, ...), RequestTimeout, and connection errors (refused, reset, closed, timed
  out) before or while reading a response that is not streamed; before retry i a jittered backoff of
  rand(0, 1) x min(2^(i-1), 20) s: at most 1 + 2 + 4 + 8 + 16 = 31 s a request (about 15 s on average).
  A client's retry quota (botocore's: 500 tokens, 5 a retry, 10 a timeout's, paid back by successes) stops
  retry storms against a store that is down: once it is spent, errors come at once.
- s3fs's own wrapper around every call (`S3FileSystem.retries`: its default, 5 tries, kept) repeats a call
  that botocore gave up on if it failed by a SlowDown, a closed connection or read timeout, or while
  streaming a GET's body (a reset mid-body, which botocore cannot retry: it has returned the response;
  s3fs repeats the GET, from the byte it reached for a whole-object download), after 0.1 x 1.7^i s.
- Worst case for one call: a 500 that persists, 6 requests and 31 s; a SlowDown or reset that persists,
  5 x 6 = 30 requests and 5 x 31 + 2 = 157 s; a store that accepts connections and never answers, those
  30 requests' 15 s read timeouts (s3fs's, kept, as is its 5 s to connect) on top, about 10 minutes. Then
  the call raises as it would without retries (a read's case gets its `errors/` row).
- 403, 404 and other 4xx are retried by neither: a permanent fault costs one request.

Why standard, not adaptive: adaptive adds a client-side rate limiter per client, i.e. per process, which
can slow that process to 0.5 requests/s after a throttle, while S3 throttles per prefix across every node;
jittered backoff spreads the retries of many workers without stalling a healthy one. Choose it, or other
numbers, with `--storage-options '{"config_kwargs": {"retries": {"mode": "adaptive", "max_attempts": 10}}}'`.
An explicit `config_kwargs.retries` also takes precedence over AWS_RETRY_MODE / AWS_MAX_ATTEMPTS and AWS
config files, so a node's environment cannot silently turn retries off. Other protocols keep fsspec's
behaviour.
"""

from __future__ import annotations

import contextlib
import copy
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import split_protocol, url_to_fs

from fetaliqa.errors import BadUrlError, CredentialsError, EmptyFileError, InputError, MissingObjectError
from fetaliqa.inputs.layout import url_path

StorageOptions = dict[str, Any] | None


S3_RETRY_DEFAULTS: dict[str, Any] = {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 5}}}
_S3_PROTOCOLS = {"s3", "s3a"}


def filesystem(url: str, storage_options: StorageOptions = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving `url` and the path of `url` on it; `BadUrlError` for an unknown scheme.

    For s3:// and s3a:// URLs, `storage_options` are merged over `S3_RETRY_DEFAULTS` (`with_retry_defaults`).
    """
    if not url:
        raise BadUrlError(repr(url), "empty URL")
    options = storage_options or {}
    if split_protocol(url)[0] in _S3_PROTOCOLS:
        options = with_retry_defaults(options)
    try:
        return url_to_fs(url, **options)
    except (ValueError, ImportError) as err:
        raise BadUrlError(url, f"no filesystem for this URL ({err})") from err


def with_retry_defaults(storage_options: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `S3_RETRY_DEFAULTS` with `storage_options` merged over it. The user's value wins at every
    key; dicts are merged key by key, so `{"config_kwargs": {"read_timeout": 30}}` keeps the retries. (A user's
    `retries.total_max_attempts` beats the default `max_attempts`: botocore reads it first.)"""
    return _merged(S3_RETRY_DEFAULTS, storage_options)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a deep copy of `base`, recursively where both values are dicts. A copy because
    botocore rewrites the `retries` dict it is given (max_attempts -> total_max_attempts)."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_dicts else copy.deepcopy(value)
    return merged


def join(base: str, *parts: str) -> str:
    """Join URL or path segments with '/', keeping the scheme of `base`."""
    return posixpath.join(base.rstrip("/"), *parts) if parts else base


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def describe_io_error(url: str, err: BaseException) -> InputError:
    """Map an error from a filesystem call on `url` to the InputError a user should see."""
    if isinstance(err, InputError):
        return err
    if isinstance(err, FileNotFoundError):
        return MissingObjectError(url, "no such file or object")
    name = type(err).__name__
    if name in {"NoCredentialsError", "PartialCredentialsError"} or "credential" in str(err).lower():
        # Never echo the error text here: some providers include key ids in it.
        return CredentialsError(url, f"no usable credentials for this storage ({name})")
    if isinstance(err, PermissionError):
        return CredentialsError(url, "access denied")
    return InputError(url, f"cannot read ({name}: {err})")


@contextlib.contextmanager
def local_copy(url: str, storage_options: StorageOptions = None, max_bytes: int | None = None) -> Iterator[str]:
    """Yield a local file path holding the object at `url` (its first `max_bytes` bytes when given).

    SimpleITK reads only local files, so remote objects are downloaded to a temporary file that is
    removed on exit, with one request (a GET, ranged with `max_bytes`; no HEAD first: at archive scale
    every request a case costs counts); local files are yielded as they are, whole. Raises
    `MissingObjectError` or `EmptyFileError` (naming `url`) before yielding.
    """
    fs, path = filesystem(url, storage_options)
    if is_local(url):
        try:
            size = os.path.getsize(path)
        except OSError as err:
            raise describe_io_error(url, err) from err
        if size == 0:
            raise EmptyFileError(url, "file is empty")
        yield path
        return
    suffix = "".join(_suffixes(url_path(url)))  # of the path: a presigned URL's query string is no suffix
    with tempfile.TemporaryDirectory(prefix="fetaliqa-") as tmp:
        local = os.path.join(tmp, "object" + suffix)
        try:
            if max_bytes is None:
                fs.get_file(path, local)
            else:
                with open(local, "wb") as f:
                    f.write(fs.cat_file(path, start=0, end=max_bytes))
        except Exception as err:  # noqa: BLE001 - every backend raises its own types
            raise describe_io_error(url, err) from err
        if not os.path.exists(local) or os.path.getsize(local) == 0:
            raise EmptyFileError(url, "file is empty")
        yield local


def put_object(fs: fsspec.AbstractFileSystem, path: str, data: bytes, local: bool) -> None:
    """Write `data` to `path` on `fs` so that readers never see a partial file.

    On an object store one PUT, which publishes the object only when complete; no `makedirs` first (it
    would cost a request, and s3fs may try to create the bucket). On a local filesystem (`local`) a hidden
    temporary file, fsynced, renamed into place, then its folder fsynced: once this returns, `path` holds
    `data` across a power loss, so a commit record written after its files never names an empty file.
    """
    if not local:
        fs.pipe_file(path, data)
        return
    parent, name = path.rsplit("/", 1)
    os.makedirs(parent, exist_ok=True)
    os.replace(synced_temporary(parent, name, data), path)
    fsync_folder(parent)


def synced_temporary(folder: str, name: str, data: bytes) -> str:
    """Write `data` to a new hidden temporary file in local `folder` (named after `name`), fsynced; its path."""
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return temporary


def fsync_folder(folder: str) -> None:
    """Make a name created or renamed in local `folder` survive a power loss."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def is_file_entry(fs: fsspec.AbstractFileSystem, entry: dict) -> bool:
    """Whether an `fs.ls(..., detail=True)` entry is a file. fsspec's local filesystem types a symlink
    "other": one to a file counts, as a user who links data into a folder expects."""
    return entry["type"] == "file" or bool(entry.get("islink") and fs.isfile(entry["name"]))


def _suffixes(path: str) -> list[str]:
    """Suffixes that tell SimpleITK the format: '.nii.gz' stays whole."""
    name = posixpath.basename(path).lower()
    if name.endswith(".nii.gz"):
        return [".nii.gz"]
    return [posixpath.splitext(name)[1]]
