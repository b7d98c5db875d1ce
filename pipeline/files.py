"""File helpers shared by every layer: one atomic write and one digest.

A file that matters (a manifest, a checkpoint, converted weights, an output) is
written beside its target and renamed into place, so a crash leaves the old
file or the new one, never a torn one.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator


#: file suffixes of videos (folder and glob sources, blinkflow label; a config's name: schema.MEDIA_SUFFIXES)
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".ts", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".y4m",
                  ".mts", ".m2ts", ".3gp", ".mxf", ".vob", ".ogv",  # camcorders (AVCHD), phones, broadcast, DVD
                  ".dv", ".m2v", ".asf", ".f4v"}  # DV tapes, MPEG-2 elementary streams, old Windows and Flash archives


def left_out(folder: Path, files: list[Path]) -> str | None:
    """The line for a folder's ``files`` not named like videos, by suffix (an animated .gif went without a word);
    None when there are none."""
    left = collections.Counter(p.suffix.lower() or "(no suffix)" for p in files
                               if p.suffix.lower() not in VIDEO_SUFFIXES and not _system_file(p))
    if not left:
        return None
    kinds = ", ".join(f"{suffix} x{count}" for suffix, count in left.most_common(5))
    return f"{folder}: left out {sum(left.values())} file(s) not named like videos ({kinds}); name them, or a glob, to use them"


def _system_file(path: Path) -> bool:
    """A file the system leaves in folders (.DS_Store, Thumbs.db, desktop.ini): nobody meant it as an input."""
    return path.name.startswith(".") or path.name.lower() in ("thumbs.db", "desktop.ini")


#: a name's longest UTF-8 spelling: file systems take 255 bytes, and outputs add a suffix and a temporary prefix
MAX_NAME_BYTES = 150


def safe_name(text: str, default: str) -> str:
    """``text`` as one file name: letters, digits, '-', '_' and '.' kept, the rest '_', no leading dots (a
    stream id '..' must not step out of its folder); ``default`` when nothing is left. A name longer than
    MAX_NAME_BYTES in UTF-8 is cut there with a digest of the whole (a 254-byte video name, or 100 CJK
    characters, could never be written: 'File name too long')."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).lstrip(".") or default
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{name.encode()[:MAX_NAME_BYTES - 9].decode('utf-8', 'ignore')}-{digest}"


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write into; renamed onto ``path`` when the block succeeds,
    removed when it raises. Writers that take a path (torch.save, PyAV) use this."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")
    try:
        yield temp
        if fsync:
            _fsync_file(temp)
        commit(temp, path, fsync=fsync)
    finally:
        temp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str, *, fsync: bool = True) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as temp:
        temp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def commit(temp: Path, path: Path, *, fsync: bool = True) -> None:
    """Rename a finished temporary file onto its target (and make the rename durable)."""
    os.replace(temp, path)
    if fsync:
        _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename itself is still atomic
    finally:
        os.close(fd)
