"""Crash-safe files: atomic writes (a temporary sibling, fsync, rename over the target) and append-only JSONL logs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fslm.errors import FslmError


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def check_dir_target(path: str | Path, flag: str) -> None:
    """FslmError (one line) unless a directory is, or can be made, at `path`: checked before anything slow runs."""
    _check_target(Path(path), flag, want_dir=True)


def check_file_target(path: str | Path, flag: str) -> None:
    """FslmError (one line) unless a file is, or can be written, at `path`: checked before anything slow runs."""
    _check_target(Path(path), flag, want_dir=False)


def _check_target(path: Path, flag: str, want_dir: bool) -> None:
    if path.exists() and path.is_dir() != want_dir:
        kind, wanted = ("a file", "a directory") if want_dir else ("a directory", "a file")
        raise FslmError(f"{path}: {flag} names {kind}; give {wanted} (a new path, or one of an earlier run)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FslmError(f"{path}: {flag} lies under {parent}, which is a file, not a directory")
            return


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_replace_dir(staging: str | Path, target: str | Path) -> None:
    """Move a fully written directory into place; the old one is removed only after the new one is there.

    The staged files are fsynced first, so a crash after the rename never leaves a directory of empty files. A kill
    between the two renames leaves `target` missing and `.target.old` holding the old directory: `recover_dir`
    (called here and wherever adapters and caches are looked up) puts it back.
    """
    staging, target = Path(staging), Path(target)
    old = _old_dir(target)
    recover_dir(target)
    _fsync_tree(staging)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(target: str | Path) -> bool:
    """Undo an `atomic_replace_dir` killed between its renames: `target` gone, `.target.old` there -> rename it back.

    Without this a stage whose adapter folder was being replaced would silently run on the bare base model.
    Returns True when it restored something.
    """
    target = Path(target)
    old = _old_dir(target)
    if target.exists() or not old.is_dir():
        return False
    try:
        os.replace(old, target)
    except OSError:  # another process got there first (or the folder is read-only): leave it to them
        return False
    _fsync_dir(target.parent)
    logging.getLogger("fslm").warning("%s: restored from %s (an earlier replacement was interrupted)", target, old.name)
    return True


def _old_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _fsync_tree(directory: Path) -> None:
    """fsync every file and folder under `directory`, so a rename of it publishes data that is on disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class JsonlLog:
    """An append-only JSONL file: each append is one write + fsync.

    Reading ignores a torn last line (a kill mid-write); `open()` cuts it off before the first append, so it is
    never glued to the next record. Nothing is modified until `open()`, so a refused run leaves files untouched.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._f: Any = None
        self._end = 0
        if path.exists():
            data = path.read_bytes()
            self._end = data.rfind(b"\n") + 1
            for n, line in enumerate(data[: self._end].split(b"\n"), 1):
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        raise FslmError(f"{path}:{n}: not a JSON line (the file was edited or damaged)") from None

    def open(self) -> JsonlLog:
        if self._f is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")  # noqa: SIM115 - kept open for the run, closed in close()
        if self._f.tell() > self._end:  # a line cut by a crash: drop it, it will be redone
            self._f.truncate(self._end)
            self._sync()
        return self

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        self._f.write(b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows))
        self._sync()
        self.rows.extend(rows)

    def truncate(self) -> None:
        self._f.truncate(0)
        self._sync()
        self.rows = []

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


@contextlib.contextmanager
def exclusive(lock: str | Path, what: str) -> Iterator[None]:
    """Hold an advisory lock on `lock` for the block: a second fslm run on the same files exits 2 naming the holder.

    The file exists only while a run holds it: it is removed when the block ends, success or failure. flock(2) is
    released by the kernel when the holder dies (SIGKILL, power loss), so the file a dead run leaves never blocks a
    rerun, which takes it over and removes it in turn. Removing a lock file races a run that opened it just before:
    whoever locks checks that the path still names the file it locked, and starts over when it does not.
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(lock, what)
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # still locked: a run that opens it now finds it gone once it gets the lock
        os.close(fd)  # releases the flock


def _lock(lock: Path, what: str) -> int:
    """An open descriptor of `lock`, flock'ed, that the path still names; FslmError naming the holder if held."""
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            holder = holder if isinstance(holder, dict) else {}
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
            command = f": {holder['command']}" if holder.get("command") else ""
            raise FslmError(f"{what} is in use by another fslm run ({who}{command}); wait for it or stop it") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed this file as we locked it: lock the path's file anew
