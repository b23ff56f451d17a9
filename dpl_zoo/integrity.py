"""Checksums of weight files, computed once and trusted while the file is unchanged.

Hashing a 100 MB file costs about a third of a warm load, so a file's sha256 is
computed once (at download or first use) and stored in a small record with the file's
size and modification time; later loads trust the record while both are unchanged and
hash again when either changed. Records are JSON files written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional


class IntegrityError(ValueError):
    """A file whose content is not the one expected; the message says what to do."""


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class FileRecord:
    """What a file held when it was hashed: its sha256, size and modification time (ns)."""
    sha256: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | Path, sha256: Optional[str] = None) -> "FileRecord":
        """A fresh record (hashing the file unless ``sha256`` was just computed)."""
        st = os.stat(path)
        return cls(sha256 or sha256_of(path), st.st_size, st.st_mtime_ns)

    def unchanged(self, path: str | Path) -> bool:
        st = os.stat(path)
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> Optional["FileRecord"]:
        try:
            return cls(str(data["sha256"]), int(data["size"]), int(data["mtime_ns"]))
        except (TypeError, KeyError, ValueError):
            return None


def verified(path: Path, expected: str, record: Optional[FileRecord], what: str, fix: str) -> FileRecord:
    """``path``'s record after checking its sha256 against ``expected``.

    The record is trusted while the file's size and mtime match it; otherwise the file is
    hashed again. A mismatch is an :class:`IntegrityError` naming ``fix`` (what to do).
    """
    if record is not None and record.sha256 == expected and record.unchanged(path):
        return record
    fresh = FileRecord.of(path)
    if fresh.sha256 != expected:
        raise IntegrityError(f"{what}: sha256 of {path} is {fresh.sha256}, expected {expected}. The file is "
                             f"truncated, corrupt or not the one recorded, and was not loaded; {fix}")
    return fresh


def read_json(path: Path) -> Optional[dict]:
    """A JSON record, or None when it is missing or unreadable (then it is rebuilt)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    """Write a record through a temporary file and a rename: never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
