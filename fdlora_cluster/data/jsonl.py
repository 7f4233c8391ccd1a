"""Reading user data: JSONL files, one row per line in any layout of `formats.py`.

Every problem names the file and the line (`data.jsonl:17: ...`), so a user can open the file at
the failing row. Blank lines are skipped; everything else must be one JSON object per line.
"""

from __future__ import annotations

import json

from .errors import DataError
from .formats import Row, parse_row

BOM = b"\xef\xbb\xbf"


def read_jsonl(path: str) -> list[Row]:
    """All rows of one JSONL file; DataError on the first bad line, or on a file with no rows."""
    rows = []
    try:
        f = open(path, "rb")  # bytes, decoded line by line: a text stream decodes ahead, in chunks, and
    except OSError as e:      # would blame a bad byte on line 40 on the line being read (line 1)
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(BOM):  # Windows tools start UTF-8 files with one
                raw = raw[len(BOM):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:  # valid JSON Python will not convert: an integer of over 4300 digits
                raise DataError(f"{path}:{lineno}: not usable JSON ({e})") from None
            except RecursionError:  # the decoder recurses once per nesting level
                raise DataError(f"{path}:{lineno}: JSON nested too deeply to read") from None
            rows.append(parse_row(obj, f"{path}:{lineno}"))
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty or only blank lines)")
    return rows


def write_jsonl(path: str, examples, client: int | str | None = None) -> None:
    """Write Examples as JSONL (the shipped scenario's export; `fdlora-cluster` reads it back)."""
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            if ex.messages is not None:
                obj = {"messages": [{"role": r, "content": c} for r, c in ex.messages]}
            else:
                obj = {"prompt": ex.prompt, "response": ex.response}
            if ex.label is not None:
                obj["label"] = ex.label
            if client is not None:
                obj["client"] = client
            f.write(json.dumps(obj) + "\n")
