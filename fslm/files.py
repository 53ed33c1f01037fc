"""Crash-safe file writes: write to a temporary sibling, fsync, rename over the target."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path


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
