"""The integrity layer: every file ee_gym writes is written atomically, and every file it reads back
fails with an error that names the file and the fix.

- :func:`write_text_atomic` / :func:`write_json_atomic`: write a temporary sibling, fsync, rename, so
  a reader (or a killed run) never sees half a file.
- :func:`read_json`: a torn or hand-edited JSON file raises :class:`CorruptFileError` naming the file
  and what to do, not a bare ``JSONDecodeError``.
- :func:`read_jsonl`: JSON lines where a torn *last* record (the trace of a run killed mid-write) is
  skipped and reported; a torn record anywhere else is corruption.

Run folders and caches are guarded by :func:`folder_lock`: one file lock per folder, the same that
cache building takes.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "CorruptFileError",
    "folder_lock",
    "read_json",
    "read_jsonl",
    "write_json_atomic",
    "write_text_atomic",
]


class CorruptFileError(RuntimeError):
    """A file ee_gym wrote earlier cannot be read back (truncated, edited by hand, or torn by a kill)."""


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent))


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """The JSON in ``path``, or :class:`CorruptFileError` naming the file and ``fix`` (what to do)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{path} is not valid JSON ({error}); {fix}") from None


def read_jsonl(path: str | os.PathLike, fix: str) -> list[dict]:
    """The records of a JSON-lines file. Blank lines are skipped; a torn last line (a run killed while
    writing it) is skipped with a warning; an unreadable line before the last is CorruptFileError."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if position == len(lines) - 1:
                warnings.warn(
                    f"{path}, line {number}: skipped a torn last record (a run was interrupted while "
                    "writing it); that step will be redone",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            raise CorruptFileError(f"{path}, line {number}: not valid JSON ({error.msg}); {fix}") from None
    return records


def folder_lock(folder: str | os.PathLike, timeout: float = -1):
    """The file lock that guards ``folder`` (``<folder>.lock`` beside it), as caches and run folders use."""
    from filelock import FileLock

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder) + ".lock", timeout=timeout)
