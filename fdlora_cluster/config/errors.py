"""ConfigError and the wording of a config's errors: each names the dotted key, the value, and
what is allowed there (`train.rounds = 'three' is not valid; expected int`,
`fusion.mix = 2.0 must be in [0, 1]`, `unknown key 'trian'; allowed keys at top level: ...`)."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


def require(cond: bool, msg: str) -> None:
    """In a validator: refuse with `msg`, which names the keys (pydantic collects it with the others)."""
    if not cond:
        raise ValueError(msg)


def config_error(source: str, msgs: list[str]) -> ConfigError:
    """Every error of one source in one ConfigError: `source: msg`, or `source: N errors:` and a list."""
    msgs = list(dict.fromkeys(msgs))
    if len(msgs) == 1:
        return ConfigError(f"{source}: {msgs[0]}")
    return ConfigError(f"{source}: {len(msgs)} errors:\n" + "\n".join(f"  - {m}" for m in msgs))


def describe(err: dict, root: type[BaseModel]) -> str:
    """One pydantic error of validating `root` as our message: the dotted key path, the value, and
    what is allowed."""
    path, tp, info, owner = _locate(err["loc"], root)
    kind, value = err["type"], err.get("input")
    if kind == "value_error":  # our validators' messages name their keys
        return str(err["ctx"]["error"])
    if kind == "extra_forbidden":
        where = path.rpartition(".")[0] if "." in path else "top level"
        return f"unknown key '{path}'; allowed keys at {where}: " + ", ".join(sorted(_keys(owner)))
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and info is not None:
        note = (info.json_schema_extra or {}).get("why")
        return f"{path} = {_shown(value, tp)} must be {_range(info.metadata)}" + (f" ({note})" if note else "")
    if kind == "too_short":
        return f"{path} must not be empty"
    if kind.endswith("_type") or kind == "literal_error":
        return f"{path} = {value!r} is not valid; expected {_expected(tp)}"
    return f"{path} = {value!r} is not valid: {err['msg']}"


def _locate(loc: tuple, root: type[BaseModel]) -> tuple[str, Any, Any, Any]:
    """An error location as (dotted key path, annotation there, its Field, the section holding it)."""
    tp, path, info, owner = root, "", None, None
    for part in loc:
        tp = _required(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            owner, info = tp, next((f for n, f in tp.model_fields.items() if (f.alias or n) == part), None)
            path = f"{path}.{part}" if path else str(part)
            if info is None:  # an unknown key
                return path, None, None, owner
            tp = info.annotation
        elif get_origin(tp) is list and isinstance(part, int):
            path, tp, info = f"{path}[{part}]", get_args(tp)[0], None
        elif get_origin(tp) is dict and part != "[key]":
            path, tp, info = f"{path}.{part}", get_args(tp)[1], None
        else:  # a union member's tag, a dict key: the error is about the value as a whole
            break
    return path, tp, info, owner


def _required(tp):
    """Optional[X] as X: a null is always allowed where it is, so errors are about X."""
    args = get_args(tp)
    if get_origin(tp) in (Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return rest[0] if len(rest) == 1 else Union[rest]
    return tp


def _keys(model) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _expected(tp) -> str:
    tp = _required(tp)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is list:
        return f"a list of {_expected(args[0])}"
    if origin is dict or tp is dict or isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _range(metadata: list) -> str:
    """`>= 0`, `> 0`, or `in [0, 1)` from a Field's bounds."""
    low = next(((f"[{m.ge}", f">= {m.ge}") if isinstance(m, Ge) else (f"({m.gt}", f"> {m.gt}")
                for m in metadata if isinstance(m, (Ge, Gt))), None)
    high = next(((f"{m.le}]", f"<= {m.le}") if isinstance(m, Le) else (f"{m.lt})", f"< {m.lt}")
                 for m in metadata if isinstance(m, (Le, Lt))), None)
    if low and high:
        return f"in {low[0]}, {high[0]}"
    return (low or high)[1]


def _shown(value, tp) -> str:
    """The value as the field holds it: an int given for a float prints as the float it became."""
    if _required(tp) is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return str(float(value))
        except OverflowError:
            pass
    return str(value)
