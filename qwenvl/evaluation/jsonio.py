"""Reading evaluation files with errors that name the file and the line, and the append-only logs.

    read_json(path)              one JSON document
    read_jsonl(path)             [(line number, record)], blank lines skipped
    read_log(path)               a per-sample log written by the runner; a torn last line (the process
                                 was killed mid-write) is dropped, any other bad line is an error
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


def read_json(path: str | Path) -> Any:
    path = _existing(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line.

    Example: a file "{\\"a\\": 1}\\n\\n{\\"a\\": 2}\\n" -> [(1, {"a": 1}), (3, {"a": 2})].
    """
    path = _existing(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    for n, line in enumerate(lines, start=1):
        if line.strip():
            out.append((n, _parse_object(line, path, n)))
    return out


def read_log(path: Path) -> list[dict]:
    """Records of a runner log. A last line without its newline is a write cut short by a kill: it is
    dropped (and cut from the file, so appending goes on cleanly); a bad complete line is an error."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    complete, _, torn = raw.rpartition(b"\n")
    if torn:
        with open(path, "r+b") as f:
            f.truncate(len(complete) + (1 if complete else 0))
    text = complete.decode("utf-8", errors="strict") if complete else ""
    return [_parse_object(line, path, n) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _parse_object(line: str, path: Path, n: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: line {n}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    return path


def field(record: dict, key: str, path: Path | str, line: int, kind: type | tuple[type, ...] | None = None) -> Any:
    """record[key], or a DataError naming the file, line and the missing/mistyped field."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: line {line}: expected an object with {key!r}, got {type(record).__name__} "
                        f"{record!r:.60}")
    if key not in record:
        raise DataError(f"{path}: line {line}: missing field {key!r} (has {sorted(record)})")
    value = record[key]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{path}: line {line}: field {key!r} should be {names}, got {type(value).__name__}")
    return value
