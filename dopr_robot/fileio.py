"""Atomic file writes: write to a temporary file in the target directory, then rename over the target.

A crash mid-write never leaves a truncated file where a good one (or none) was. A full disk (or quota) is one
`UserError` naming the file, with the temporary file removed and the earlier file, if any, untouched: libraries
that hide the OSError behind their own exception (torch.save) write through `atomic_file`, which remembers it,
and HDF5 files are built in memory (`atomic_buffer`), because HDF5 itself does not survive a failed write.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from dopr_robot.errors import UserError

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Ctrl-C waits for the block: files it writes together (a checkpoint and the trainer state) are all
    completed, then the interrupt is delivered as usual. Without this, a KeyboardInterrupt raised inside
    torch.save's zip writer turns into a RuntimeError from its cleanup (a traceback instead of the `interrupted`
    line). A no-op outside the main thread, or where SIGINT is ignored or not Python's to handle."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN (a background job), SIG_DFL, or not set from Python
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here


def out_of_space_error(path: str | os.PathLike, error: BaseException | None, needed: int | None = None
                       ) -> UserError | None:
    """The one-line error for a write of `path` that failed (or, `needed` bytes, would fail) because the disk or
    the quota is full; None when `error` is something else."""
    if not isinstance(error, OSError) or error.errno not in OUT_OF_SPACE:
        return None
    need = f"it needs {needed / 2**20:.1f} MiB, " if needed is not None else ""
    return UserError(f"cannot write {path}: {os.strerror(error.errno)} ({need}{_free_text(Path(path).parent)}); "
                     f"nothing there was replaced")


def _free_text(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free on its file system"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; on clean exit it is renamed to `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    except OSError as e:
        raise out_of_space_error(path, e) or e
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to collaborators
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        full = out_of_space_error(path, e)
        if full is not None:
            raise full from None
        raise


class _RecordingFile:
    """A binary file that keeps the OSError of a failed write, for callers whose library replaces it with its
    own exception (torch.save raises RuntimeError("unexpected pos ...") instead)."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = e
            raise

    def tell(self) -> int:
        return self._f.tell()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[BinaryIO]:
    """`atomic_path`, opened for binary writing (flushed and fsync'd before the rename). A full disk is the
    one-line `UserError` whatever exception the writing library turned it into."""
    with atomic_path(path, suffix) as tmp:
        with open(tmp, "wb") as raw:
            f = _RecordingFile(raw)
            try:
                yield f  # type: ignore[misc]
                f.flush()
                os.fsync(raw.fileno())
            except BaseException as e:
                if f.error is not None and e is not f.error:
                    raise f.error from None  # atomic_path reports it (disk full) or passes it on
                raise


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` atomically; a disk without room for it fails before anything is written."""
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else None
    except OSError:
        free = None
    if free is not None and len(data) > free:  # fail before writing (a concurrent writer can still fill it)
        raise out_of_space_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), needed=len(data))
    with atomic_file(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_buffer(path: str | os.PathLike) -> Iterator[io.BytesIO]:
    """An in-memory binary buffer, written to `path` (atomically, by `write_bytes`) on clean exit.

    For HDF5 (`h5py.File(buffer, "w")`): once one of its own writes fails (ENOSPC), HDF5 2.0 segfaults in the
    next flush or close, killing the process with its temporary file left behind (a known HDF5 limitation, h5py
    issues #914 and #2160: a file that failed to write cannot be closed); a Python write of the finished image
    fails cleanly instead. The cost: the file's bytes are held in memory once."""
    buffer = io.BytesIO()
    yield buffer
    write_bytes(path, buffer.getbuffer())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (a metrics log; appends of one short line are atomic enough on POSIX)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise out_of_space_error(path, e) or e
