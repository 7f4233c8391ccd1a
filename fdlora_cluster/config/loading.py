"""A config file as a raw mapping, before validation: strict YAML (a key given twice is an error,
as are values no later step can handle), `include: other.yaml` merged under the file, `--set
key.path=value` overrides, and the recursive merge that both use (the DeepSpeed dict too).

    raw = read_yaml("configs/demo.yaml")
    apply_override(raw, "train.rounds=5")
"""

from __future__ import annotations

import os
import re

import yaml

from .errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float, as YAML 1.2 does. PyYAML follows YAML 1.1, whose
    float needs a dot (`1.0e-5`), and returns the string '1e-5', which the typed config then refuses
    as "not a number": the way most people write a learning rate or a delta."""


# YAML 1.1's float pattern (PyYAML's resolver) with the dot made optional before an exponent
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


class _StrictLoader(_Loader):
    """Also refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _no_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"{node.start_mark.name}:{key_node.start_mark.line + 1}: key {key!r} is given twice")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


MAX_VALUES = 100_000
"""A config expands to at most this many values: YAML aliases can make a few lines stand for
billions (or for a loop), which every later step would walk."""


def _check_size(raw, where: str) -> None:
    """Refuses what later steps cannot handle: more than MAX_VALUES values, and integers too long
    to print (`0xfff...` reads as one; Python's str() refuses over 4300 digits, and every error
    message prints the value it is about)."""
    seen, stack = 0, [raw]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(f"{where}: expands to more than {MAX_VALUES} values (YAML aliases that repeat, "
                              "or refer to, themselves?)")
        if isinstance(node, int) and node.bit_length() > 13_000:
            raise ConfigError(f"{where}: holds an integer of {node.bit_length()} bits; no setting takes one that large")
        if isinstance(node, dict):
            stack.extend(node.values())
            stack.extend(node.keys())
        elif isinstance(node, list):
            stack.extend(node)


def _parse_yaml(text, where: str, loader=_StrictLoader):
    """YAML text or an open file as Python values; every way it can fail is a ConfigError naming `where`."""
    try:
        value = yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:  # PyYAML builds nested values recursively
        raise ConfigError(f"{where}: nested too deeply to read") from None
    except (ValueError, TypeError, OverflowError) as e:  # PyYAML's constructors do not wrap their own errors:
        # an integer of 5000 digits, `2001-13-45` read as a date, `!!int x`
        raise ConfigError(f"{where}: not valid YAML: a value cannot be read ({e})") from None
    _check_size(value, where)
    return value


def read_yaml(path: str, _seen: tuple = ()) -> dict:
    """One YAML file as a mapping, with `include: other.yaml` (relative to the file) merged under it:
    the included file's keys first, this file's keys over them, section by section."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"{path}: include loop through {' -> '.join(_seen)}")
    with open(path, encoding="utf-8") as f:
        raw = _parse_yaml(f, path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    include = raw.pop("include", None)
    if include is None:
        return raw
    if not isinstance(include, str):
        raise ConfigError(f"{path}: include must be one file name, got {include!r}")
    target = os.path.join(os.path.dirname(path), include)
    if not os.path.isfile(target):
        raise ConfigError(f"{path}: include: file {target} not found")
    base = read_yaml(target, _seen + (os.path.abspath(path),))
    return merge(base, raw)


def apply_override(raw: dict, item: str) -> None:
    """Apply one `--set a.b.c=value` (value parsed as YAML) to the raw mapping."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty part in key path {key!r}")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = _parse_yaml(value, f"--set {item!r}", _Loader) if value != "" else None


def merge(a: dict, b: dict) -> dict:
    """`b` over a copy of `a`, mapping by mapping (lists and values of `b` replace those of `a`)."""
    out = {k: (merge(v, {}) if isinstance(v, dict) else v) for k, v in a.items()}
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
