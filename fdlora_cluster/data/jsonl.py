"""Reading user data: JSONL rows of {"prompt", "response"} with optional "label" and "client".

Every problem names the file and the line (`data.jsonl:17: ...`), so a user can open the file at
the failing row. Blank lines are skipped; everything else must be one JSON object per line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .examples import Example


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and line (or the client)."""


@dataclass(frozen=True)
class Row:
    """One JSONL row and where it came from (kept for error messages after partitioning)."""

    example: Example
    client: int | None
    path: str
    line: int


REQUIRED = ("prompt", "response")
OPTIONAL = ("label", "client")


def parse_row(obj, path: str, line: int) -> Row:
    """Check one decoded JSON value and turn it into a Row; raises DataError naming path:line."""
    where = f"{path}:{line}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object {{\"prompt\": ..., \"response\": ...}}, "
                        f"got {type(obj).__name__}")
    for k in REQUIRED:
        if k not in obj:
            raise DataError(f"{where}: missing field {k!r} (every row needs \"prompt\" and \"response\")")
        if not isinstance(obj[k], str):
            raise DataError(f"{where}: field {k!r} must be a string, got {type(obj[k]).__name__}")
    if obj["response"] == "":
        raise DataError(f"{where}: field 'response' is empty (the loss needs at least one response token)")
    label = obj.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        raise DataError(f"{where}: field 'label' must be a string or integer, got {type(label).__name__}")
    client = obj.get("client")
    if client is not None and (isinstance(client, bool) or not isinstance(client, int) or client < 0):
        raise DataError(f"{where}: field 'client' must be a non-negative integer, got {client!r}")
    ex = Example(obj["prompt"], obj["response"], None if label is None else str(label))
    return Row(ex, client, path, line)


def read_jsonl(path: str) -> list[Row]:
    """All rows of one JSONL file; DataError on the first bad line, or on a file with no rows."""
    rows = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason})") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(parse_row(obj, path, lineno))
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty or only blank lines)")
    return rows


def write_jsonl(path: str, examples, client: int | None = None) -> None:
    """Write Examples as JSONL (the shipped scenario's export; `fdlora-cluster` reads it back)."""
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            obj = {"prompt": ex.prompt, "response": ex.response}
            if ex.label is not None:
                obj["label"] = ex.label
            if client is not None:
                obj["client"] = client
            f.write(json.dumps(obj) + "\n")
