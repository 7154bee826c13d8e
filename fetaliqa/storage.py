"""Object storage through fsspec: any URL fsspec knows (s3://, gs://, file://, memory://) or a local path.

Credentials come from fsspec's own chain (for S3: the AWS environment variables, profiles, instance
roles) or from `storage_options`; nothing here logs them or copies them into outputs.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from fetaliqa.errors import BadUrlError, CredentialsError, EmptyFileError, InputError, MissingObjectError

StorageOptions = dict[str, Any] | None


def filesystem(url: str, storage_options: StorageOptions = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving `url` and the path of `url` on it; `BadUrlError` for an unknown scheme."""
    if not url:
        raise BadUrlError(repr(url), "empty URL")
    try:
        return url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError) as err:
        raise BadUrlError(url, f"no filesystem for this URL ({err})") from err


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
    suffix = "".join(_suffixes(path))
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
    temporary = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    folder = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


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
