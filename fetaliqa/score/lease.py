"""One live run per output: a lease in `<output>/_fetaliqa/lease.json`.

A scoring run takes the lease before it changes anything in its output (before `--overwrite`'s reset and
`ledger.resume`'s sweep), refreshes its heartbeat every `HEARTBEAT_S` (15) seconds from a daemon thread while
it runs, and deletes it when it ends, normally or by an exception. The lease names its holder (JSON):

  run_id, host, pid, pid_started (the process's start time, seconds since the epoch, from psutil),
  since, heartbeat (UTC, ISO 8601 to the millisecond)

A run that finds a live lease is refused with one line naming the holder and since when (`LeaseHeldError`,
exit 2), before it deletes anything. A lease is dead, and the next run takes it over, when
- its heartbeat is older than `TIMEOUT_S` (120 s): its holder was killed, its node lost, or it hung; or
- it was taken on this host by a process that is gone: no process with its pid *and* start time (a pid since
  reused by another process does not count), so a rerun right after `kill -9` of the driver starts at once.
Hosts' clocks are assumed to agree within seconds (the timeout is minutes). Host names identify machines: two
containers sharing one host name and not one process table would see each other's holders as gone.

Atomicity, by storage:
- S3 (s3fs): taking is a conditional PUT (`If-None-Match: *`); a takeover, a heartbeat and the release are
  conditional on the ETag last read or written (`If-Match`), so of two runs racing for a lease exactly one wins,
  and a holder whose lease was taken over learns it at its next heartbeat (412 Precondition Failed). A store that
  ignores these headers degrades to the best effort below.
- a local disk: taking links a complete, fsynced temporary file to the lease's name (`link(2)` fails when the name
  exists, as `O_CREAT | O_EXCL` does, and a reader never sees a half-written lease). A takeover renames the dead
  lease aside (of two contenders one rename succeeds), checks that what it moved is the lease it judged dead
  (else puts it back and starts over), then links its own. A heartbeat checks that the lease is still its own,
  then renames a fresh file over it: a takeover racing that heartbeat needs the holder to have missed heartbeats
  for `TIMEOUT_S` first.
- any other filesystem (gs://, memory://, ...): best effort, a read then a write; two runs starting in the same
  instant can both take it.
A heartbeat that finds no lease (deleted by hand) takes it again, exclusively as above.

A holder whose lease was taken over (it hung for `TIMEOUT_S`, or lost a race) stops committing: `ledger.write_part`
refuses to write a part while the lease names another run (`check`), the heartbeat thread logs the loss, and
the run ends with `LeaseLostError` (exit 2) instead of marking `run.json` complete. A part already past that check
when the lease changed hands may commit afterwards; `ledger.resume` drops records naming deleted files.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator

import fsspec.asyn
import psutil

from fetaliqa.errors import FetaliqaError
from fetaliqa.inputs import storage
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.redact import public_url
from fetaliqa.score.schema import LEDGER_DIR

log = logging.getLogger("fetaliqa")

LEASE = f"{LEDGER_DIR}/lease.json"
HEARTBEAT_S = 15.0
TIMEOUT_S = 120.0


class LeaseHeldError(FetaliqaError):
    """Another run holds the output's live lease."""


class LeaseLostError(FetaliqaError):
    """This run's lease was taken over by another run."""


class _Changed(Exception):
    """A conditional write or delete found the lease other than the caller last saw it."""


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def describe(holder: dict) -> str:
    """'run R on HOST (pid P) since T'."""
    return (f"run {holder.get('run_id', '?')} on {holder.get('host', '?')} (pid {holder.get('pid', '?')}) "
            f"since {holder.get('since', '?')}")


def dead_because(holder: dict, timeout_s: float = TIMEOUT_S) -> str | None:
    """Why the lease `holder` is dead (see the module docstring), or None while it is live."""
    try:
        age = (now() - datetime.datetime.fromisoformat(holder["heartbeat"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return "the lease is unreadable"
    if age > timeout_s:
        return f"its last heartbeat is {age:.0f} s old (timeout {timeout_s:.0f} s)"
    if holder.get("host") == socket.gethostname() and not _process_alive(holder.get("pid"), holder.get("pid_started")):
        return f"its process {holder.get('pid')} on this host is gone"
    return None


def _process_alive(pid, started) -> bool:
    try:
        process = psutil.Process(int(pid))
        return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - float(started)) < 0.01
    except psutil.AccessDenied:
        return True  # cannot tell: live until its heartbeat stops
    except (psutil.NoSuchProcess, TypeError, ValueError):
        return False


def check(output_url: str, run_id: str, storage_options: StorageOptions = None) -> None:
    """Raise `LeaseLostError` when the output's lease names another run than `run_id` (no lease: no objection)."""
    fs, root = storage.filesystem(output_url, storage_options)
    try:
        holder = _parse(_store(fs, f"{root}/{LEASE}", storage.is_local(output_url)).read()[0])
    except FileNotFoundError:
        return
    if holder.get("run_id") != run_id:
        raise LeaseLostError(f"run {run_id} lost its lease on {public_url(output_url)} to {describe(holder)}: "
                             "it commits nothing more; that run finishes the output")


class Lease:
    """The lease of `output_url` for run `run_id`: `take` it, `refresh` it, `release` it; or `hold` it all."""

    def __init__(self, output_url: str, run_id: str, storage_options: StorageOptions = None,
                 heartbeat_s: float = HEARTBEAT_S, timeout_s: float = TIMEOUT_S):
        fs, root = storage.filesystem(output_url, storage_options)
        self.output_url, self.run_id = output_url, run_id
        self.heartbeat_s, self.timeout_s = heartbeat_s, timeout_s
        self.lost: str | None = None  # set (a one-line reason) once the heartbeat finds the lease taken over
        self._store = _store(fs, f"{root}/{LEASE}", storage.is_local(output_url))
        self._holder = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                        "pid_started": psutil.Process().create_time(), "since": None, "heartbeat": None}
        self._token = None  # what the lease last read or written is known by: its ETag on S3, its bytes elsewhere
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> str | None:
        """Take the lease; returns None, or a note naming the dead holder it took over. `LeaseHeldError` when
        another run holds it live."""
        self._holder["since"] = _stamp()
        for _ in range(8):  # each pass sees the lease change hands once; contenders settle in a pass or two
            try:
                self._token = self._store.create(self._content())
                return None
            except FileExistsError:
                pass
            try:
                content, token = self._store.read()
            except FileNotFoundError:
                continue
            holder = _parse(content)
            if holder.get("run_id") == self.run_id:  # our own PUT, retried after its answer was lost
                self._token = token
                return None
            reason = dead_because(holder, self.timeout_s)
            if reason is None:
                raise LeaseHeldError(
                    f"{public_url(self.output_url)} is being written by {describe(holder)}, last heartbeat at "
                    f"{holder.get('heartbeat')}: wait for it to end (a lease without a heartbeat for "
                    f"{self.timeout_s:.0f} s is taken over)")
            try:
                self._token = self._store.take_over(self._content(), token)
            except (_Changed, FileExistsError):
                continue
            return f"took over the lease of {describe(holder)}: {reason}"
        raise LeaseHeldError(f"{public_url(self.output_url)}: its lease keeps changing hands; another run is starting")

    def refresh(self) -> None:
        """Write a new heartbeat; `LeaseLostError` when the lease is another run's now."""
        try:
            try:
                self._token = self._store.refresh(self._content(), self._token)
            except FileNotFoundError:
                self._token = self._store.create(self._content())
        except (_Changed, FileExistsError) as err:
            self.lost = self._lost_line()
            raise LeaseLostError(self.lost) from err

    def release(self) -> None:
        """Delete the lease if it is still this run's."""
        with contextlib.suppress(_Changed, FileNotFoundError):
            self._store.delete(self._token)

    @contextlib.contextmanager
    def hold(self) -> Iterator[Lease]:
        """Keep the (taken) lease's heartbeat while the block runs, then release it. An exception leaving the
        block when the lease was lost becomes `LeaseLostError`: the loss is why the run failed."""
        self._thread = threading.Thread(target=self._beat, name="fetaliqa-lease", daemon=True)
        self._thread.start()
        try:
            yield self
        except BaseException as err:
            self._stop_beating()
            if not self.lost and self._taken_by_another():
                self.lost = self._lost_line()
            if self.lost:
                raise LeaseLostError(self.lost) from err
            raise
        finally:
            self._stop_beating()
            if not self.lost:
                self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except LeaseLostError:
                log.error(self.lost)
                return
            except Exception as err:  # noqa: BLE001 - a storage hiccup: the lease dies only after TIMEOUT_S of them
                log.warning("lease heartbeat on %s failed (%s: %s); trying again in %.0f s",
                            public_url(self.output_url), type(err).__name__, err, self.heartbeat_s)

    def _stop_beating(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _taken_by_another(self) -> bool:
        try:
            return _parse(self._store.read()[0]).get("run_id") != self.run_id
        except OSError:  # no lease, or the storage fails too: the exception being raised says more
            return False

    def _lost_line(self) -> str:
        try:
            holder = describe(_parse(self._store.read()[0]))
        except FileNotFoundError:
            holder = "nobody (deleted)"
        return (f"run {self.run_id} lost its lease on {public_url(self.output_url)} to {holder}: "
                "it commits nothing more; that run finishes the output")

    def _content(self) -> bytes:
        return json.dumps({**self._holder, "heartbeat": _stamp()}).encode()


def _stamp() -> str:
    return now().isoformat(timespec="milliseconds")


def _parse(content: bytes) -> dict:
    try:
        holder = json.loads(content)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _store(fs, path: str, local: bool):
    if local:
        return _LocalLease(path)
    if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return _S3Lease(fs, path)
    return _BestEffortLease(fs, path)


# What link(2) answers on a filesystem that makes no hard links (some FUSE and SMB mounts, FAT).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


class _LocalLease:
    """The lease file on a local disk; a token is the file's bytes."""

    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(path)

    def read(self) -> tuple[bytes, bytes]:
        with open(self.path, "rb") as f:
            content = f.read()
        return content, content

    def create(self, content: bytes) -> bytes:
        os.makedirs(self.folder, exist_ok=True)
        temporary = storage.synced_temporary(self.folder, "lease", content)
        try:
            os.link(temporary, self.path)  # FileExistsError when there is a lease
        except FileExistsError:
            raise
        except OSError as err:
            if err.errno not in _NO_HARD_LINKS:
                raise
            raise FetaliqaError(
                f"{self.folder}: cannot take the output's lease: this filesystem makes no hard links "
                f"({err.strerror}), which the lease needs to be exclusive; write --output to a local disk, NFS or "
                "object storage") from err
        finally:
            os.unlink(temporary)
        storage.fsync_folder(self.folder)
        return content

    def take_over(self, content: bytes, token: bytes) -> bytes:
        aside = f"{self.path}.{uuid.uuid4().hex}.aside"
        try:
            os.rename(self.path, aside)  # one contender's rename moves it: the others' raise
        except FileNotFoundError as err:
            raise _Changed from err
        with open(aside, "rb") as f:
            moved = f.read()
        if moved != token:  # its holder beat in between: put the live lease back (unless one was made meanwhile)
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.unlink(aside)
            raise _Changed
        os.unlink(aside)
        return self.create(content)

    def refresh(self, content: bytes, token: bytes) -> bytes:
        if self.read()[0] != token:
            raise _Changed
        os.replace(storage.synced_temporary(self.folder, "lease", content), self.path)
        storage.fsync_folder(self.folder)
        return content

    def delete(self, token: bytes) -> None:
        if self.read()[0] != token:
            raise _Changed
        os.unlink(self.path)



class _S3Lease:
    """The lease object on S3; a token is its ETag. Conditional requests through s3fs's botocore client."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[bytes, str]:
        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        return fsspec.asyn.sync(self.fs.loop, get)

    def create(self, content: bytes) -> str:
        return self._put(content, IfNoneMatch="*")  # s3fs raises FileExistsError on its 412

    def take_over(self, content: bytes, token: str) -> str:
        return self._put(content, IfMatch=token)

    refresh = take_over

    def delete(self, token: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
        except OSError as err:
            _raise_changed_if_precondition(err)
            raise

    def _put(self, content: bytes, **condition) -> str:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=content, **condition)["ETag"]
        except OSError as err:  # FileExistsError included
            # botocore retries a PUT whose answer was lost (a reset, a 500 after the store wrote it): that retry's
            # condition fails against our own write. The lease holding exactly `content` says the write landed.
            landed = self._etag_if_holding(content)
            if landed:
                return landed
            if not isinstance(err, FileExistsError):
                _raise_changed_if_precondition(err)
            raise

    def _etag_if_holding(self, content: bytes) -> str | None:
        try:
            current, etag = self.read()
        except OSError:
            return None
        return etag if current == content else None


def _raise_changed_if_precondition(err: OSError) -> None:
    """s3fs turns a 412 (and S3's 409 for a concurrent conditional write) into a plain OSError: find its cause."""
    code = getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")
    if code in {"PreconditionFailed", "ConditionalRequestConflict"}:
        raise _Changed from err


class _BestEffortLease:
    """The lease on a filesystem without conditional writes: read, compare, write (not atomic)."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes, bytes]:
        content = self.fs.cat_file(self.path)
        return content, content

    def create(self, content: bytes) -> bytes:
        if self.fs.exists(self.path):
            raise FileExistsError(self.path)
        self.fs.pipe_file(self.path, content)
        return content

    def take_over(self, content: bytes, token: bytes) -> bytes:
        if self.read()[0] != token:
            raise _Changed
        self.fs.pipe_file(self.path, content)
        return content

    refresh = take_over

    def delete(self, token: bytes) -> None:
        if self.read()[0] != token:
            raise _Changed
        self.fs.rm_file(self.path)
