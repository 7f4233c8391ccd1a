"""One row of user data, in any of the three layouts, checked and turned into an Example.

    prompt/response   {"prompt": ..., "response": ...}
    instruction       {"instruction": ..., "input": ... (optional), "output": ...}   (Alpaca)
    chat              {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}

Any layout may add "label" (string or integer) and "client" (a name or an index). Other keys are
ignored (datasets often carry ids and the like). Every problem names where the row is, as the
reader gives it (`data.jsonl:17`, `my_dataset row 16`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .chat import ASSISTANT, plain_prompt
from .errors import DataError
from .examples import Example

LAYOUTS = {"prompt/response": ("prompt", "response"), "instruction": ("instruction", "output"),
           "chat": ("messages",)}
"""Each layout's required fields; a row's layout is the one whose fields (or `input`) it has."""
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
"""The Stanford Alpaca prompts (with and without `input`); the output follows the prompt."""


@dataclass(frozen=True)
class Row:
    """One row and where it came from (kept for error messages after partitioning)."""

    example: Example
    client: int | str | None
    """The row's `client`: an index (int >= 0), a name (non-empty string), or None."""

    @property
    def where(self) -> str:
        return self.example.where


def _text(v: str, what: str, where: str) -> str:
    """`v` if it is Unicode text: JSON's \\ud800 escapes decode to lone surrogates, which no
    tokenizer (and no UTF-8 log file) takes; refused here, where the row is known."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: {what} holds {v[e.start]!r} at character {e.start}, a lone surrogate "
                        "(half of a \\uXXXX pair), which is not text") from None
    return v


def _string(obj: dict, key: str, where: str, empty_ok: bool = True) -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    _text(v, f"field {key!r}", where)
    if not empty_ok and v == "":
        raise DataError(f"{where}: field {key!r} is empty (the loss needs at least one token to learn)")
    return v


def _messages(value, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(value):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            hint = " (ShareGPT's from/value is not read: rename to role/content)" if isinstance(m, dict) and "from" in m else ""
            raise DataError(f"{at} must be an object with 'role' and 'content'{hint}")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not role:
            raise DataError(f"{at}: 'role' must be a non-empty string, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{at}: 'content' must be a string, got {type(content).__name__}")
        _text(role, "'role'", at), _text(content, "'content'", at)
        if role == ASSISTANT and content == "":
            raise DataError(f"{at}: an assistant turn is empty (the loss needs at least one token to learn)")
        out.append((role, content))
    if out[-1][0] != ASSISTANT:
        raise DataError(f"{where}: the last message must be the assistant's (it is the one trained on "
                        f"and scored); this row ends with a {out[-1][0]!r} message")
    return tuple(out)


def _layout(obj: dict, where: str) -> str:
    found = [name for name, keys in LAYOUTS.items()
             if any(k in obj for k in keys) or name == "instruction" and "input" in obj]
    if not found:
        raise DataError(f"{where}: no known layout; a row needs \"prompt\" and \"response\", or \"instruction\" and "
                        f"\"output\" (Alpaca), or \"messages\" (chat); it has {sorted(map(str, obj))[:8]}")
    if len(found) > 1:
        raise DataError(f"{where}: the row mixes layouts ({' and '.join(found)}); give one of them per row")
    return found[0]


def parse_row(obj, where: str) -> Row:
    """Check one decoded row and turn it into a Row; DataError names `where` and the field."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object such as {{\"prompt\": ..., \"response\": ...}}, "
                        f"got {type(obj).__name__}")
    layout = _layout(obj, where)
    for k in LAYOUTS[layout]:
        if k not in obj:
            raise DataError(f"{where}: missing field {k!r} (a {layout} row needs "
                            f"{' and '.join(repr(x) for x in LAYOUTS[layout])})")
    label = obj.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        raise DataError(f"{where}: field 'label' must be a string or integer, got {type(label).__name__}")
    if isinstance(label, str):
        _text(label, "field 'label'", where)
    label = None if label is None else str(label)
    client = obj.get("client")
    if client is not None and (isinstance(client, bool) or not isinstance(client, (int, str))
                               or client == "" or isinstance(client, int) and client < 0):
        raise DataError(f"{where}: field 'client' must be a client name (a non-empty string) or index "
                        f"(an integer >= 0), got {client!r}")
    if isinstance(client, str):
        _text(client, "field 'client'", where)
    if layout == "prompt/response":
        ex = Example(_string(obj, "prompt", where), _string(obj, "response", where, empty_ok=False), label,
                     where=where)
    elif layout == "instruction":
        instruction, output = _string(obj, "instruction", where), _string(obj, "output", where, empty_ok=False)
        extra = _string(obj, "input", where) if obj.get("input") is not None else ""
        prompt = (ALPACA_INPUT if extra else ALPACA).format(instruction=instruction, input=extra)
        ex = Example(prompt, output, label, where=where)
    else:
        messages = _messages(obj["messages"], where)
        ex = Example(plain_prompt(messages), messages[-1][1], label, messages=messages, where=where)
    return Row(ex, client)
