"""Bad input, tried at scale: generated configs, `--set` overrides and data lines (hypothesis).

Each must load, or end in the loader's documented error (ConfigError, DataError) naming the key or
the file:line; never another exception, a hang (pytest-timeout), or a file written. derandomize
keeps CI reproducible: the same examples every run.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from fdlora_cluster.config import (Config, ConfigError, DataConfig, apply_override, check_environment, config_from_dict,
                                   load_config, read_yaml)
from fdlora_cluster.data import ByteTokenizer, DataError, check_responses_fit, collate, load_clients, read_jsonl

from conftest import CONFIGS

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]  # timeout: a hang fails the test


def props(n: int):
    # deadline None: this runs on loaded 2-core CI machines; the timeout above catches a real hang.
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*")}


# ------------------------------------------------------------------ values a user could write

# JSON/YAML-like values, with the edges that broke loaders before: huge integers, nan, inf,
# lone surrogates, deep and empty containers.
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 10), st.sampled_from([-1, 0, 2**20 + 1, 10**12, 2**64, -(2**70)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10), st.sampled_from(["", "llama", "fdlora", "iid", "gloo", "float16", "nesterov", "1", "x.y"]),
)
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                      max_leaves=6)


def typed_paths(cls=Config, prefix="") -> list[str]:
    """Every YAML key path the config declares (the sections' fields, recursively)."""
    out = []
    for name, f in cls.model_fields.items():
        key = prefix + (f.alias or name)
        out.append(key)
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out += typed_paths(f.annotation, key + ".")
    return out


# model.config and deepspeed pass through to transformers and DeepSpeed, which own their keys;
# the loader reads only these of them.
PASSED_THROUGH_BUT_READ = ["deepspeed.zero_optimization", "deepspeed.zero_optimization.stage", "deepspeed.bf16",
                           "deepspeed.bf16.enabled", "deepspeed.bfloat16", "deepspeed.fp16.enabled", "deepspeed.optimizer",
                           "deepspeed.optimizer.params", "deepspeed.optimizer.params.lr", "deepspeed.scheduler",
                           "deepspeed.train_micro_batch_size_per_gpu", "deepspeed.gradient_accumulation_steps",
                           "model.config.model_type", "client_overrides.0.inner_steps", "client_overrides.1.deepspeed",
                           "client_overrides.7.micro_batch_size", "include"]
PATHS = typed_paths() + PASSED_THROUGH_BUT_READ
KEY_PATHS = st.one_of(st.sampled_from(PATHS),
                      st.builds(lambda p, k: f"{p}.{k}" if p else k, st.sampled_from([""] + typed_paths()),
                                st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters=".="),
                                        min_size=3, max_size=6)))  # 3+: a one-letter key is "named" by any message


def set_path(raw: dict, path: str, value) -> None:
    node = raw
    for part in path.split(".")[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path.split(".")[-1]] = value


DECLARED = set(PATHS) | {p.rsplit(".", 1)[-1] for p in PATHS}


def names_the_key(msg: str, path: str) -> bool:
    """The error names the key (its full path), or a declared section or field on the way to it
    (`topology: give either clients ... or num_clients`, a cross-field check naming the relation)."""
    parts = path.split(".")
    named = [path] + [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in DECLARED]
    return any(p in msg for p in named + ([parts[-1]] if parts[-1] in DECLARED else []))


@pytest.fixture(scope="module")
def demo():
    return read_yaml(str(CONFIGS / "demo.yaml"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path anything wrote would land here
    return tmp_path


def load_or_config_error(workdir: Path, raw, overrides=()):
    """The ConfigError of loading `raw` with `overrides`, or None when it loaded; checks that
    nothing was written (no output_dir either). `raw` is the text of a config file (load_config),
    or a dict: the steps of load_config after read_yaml, without parsing the demo's YAML again
    (PyYAML in Python: 30 ms a parse, 10x the rest; the file test below covers read_yaml)."""
    path = workdir / "c.yaml"
    if isinstance(raw, str):
        path.write_text(raw)
    before = snapshot(workdir)
    try:
        if isinstance(raw, str):
            cfg = load_config(path, list(overrides))
        else:
            raw = copy.deepcopy(raw)
            for item in overrides:
                apply_override(raw, item)
            cfg = config_from_dict(raw, str(path))
    except ConfigError as e:
        err = e
    else:
        assert isinstance(cfg, Config)
        try:  # what `check` says next: the checks that need installed packages
            check_environment(cfg, str(path))
            err = None
        except ConfigError as e:
            err = e
    assert snapshot(workdir) == before  # the cwd: the demo's relative output_dir would appear here
    return err


@props(1000)
@given(mutations=st.lists(st.tuples(KEY_PATHS, VALUES), min_size=1, max_size=1))
@example(mutations=[("model.config.model_type", [1])])      # was a TypeError (unhashable) from the type lookup
@example(mutations=[("topology", {"num_clients": 10**9, "ranks_per_client": 1})])  # was a 10**9 list
@example(mutations=[("client_overrides", {0.5: {"inner_steps": 1}})])  # was silently client 0
@example(mutations=[("deepspeed.bfloat16", 3)])              # was an AttributeError
@example(mutations=[("deepspeed.bf16.enabled", [1])])         # was passed on to DeepSpeed
def test_a_config_with_a_generated_value_loads_or_names_the_key(demo, workdir, mutations):
    raw = copy.deepcopy(demo)
    for path, value in mutations:
        set_path(raw, path, value)
    err = load_or_config_error(workdir, raw)
    if err is not None:
        assert names_the_key(str(err), mutations[0][0]), (mutations, str(err))


OVERRIDE_VALUES = st.one_of(VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
                            st.text(max_size=12))


@props(800)
@given(items=st.lists(st.one_of(st.tuples(KEY_PATHS, OVERRIDE_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
                                st.text(max_size=12)), min_size=1, max_size=2))
@example(items=["train.rounds=["])                          # was a yaml ParserError
@example(items=["train.rounds=\t"])                         # was a yaml ScannerError
@example(items=["seed=" + "[" * 5000 + "]" * 5000])          # was a RecursionError
def test_set_overrides_load_or_name_the_item_or_key(demo, workdir, items):
    err = load_or_config_error(workdir, demo, items)
    if err is not None:
        msg = str(err)
        assert any(f"--set {it!r}" in msg or ("=" in it and names_the_key(msg, it.split("=", 1)[0])) for it in items), \
            (items, msg)


@props(150)
@given(text=st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                      VALUES.map(lambda v: yaml.safe_dump(v)),
                      st.sampled_from(["a: &a [*a]\nseed: *a\n", "{", "seed: 1\nseed: 2\n", "include: c.yaml\n",
                                       "seed: 2001-13-45\n", "seed: !!float x\n", "seed: 0x" + "f" * 4000 + "\n",
                                       "a: &x [1,1,1,1,1,1,1,1,1,1]\nb: &y [*x,*x,*x,*x,*x,*x,*x,*x,*x,*x]\n"
                                       "c: &z [*y,*y,*y,*y,*y,*y,*y,*y,*y,*y]\nd: [*z,*z,*z,*z,*z,*z,*z,*z,*z,*z,*z]\n"])))
@example(text="seed: " + "[" * 5000)                         # was a RecursionError in the YAML parser
def test_a_whole_config_file_of_generated_text_is_a_config_error(workdir, text):
    err = load_or_config_error(workdir, text)
    assert err is not None and str(err).startswith(str(workdir / "c.yaml")), str(err)


def test_a_config_file_that_is_not_utf8_names_the_file(workdir):
    (workdir / "c.yaml").write_bytes(b"seed: \xff\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid UTF-8 \(invalid start byte at byte 6\)"):
        load_config(workdir / "c.yaml")


# ------------------------------------------------------------------ data lines

GOOD_ROWS = st.sampled_from([
    {"prompt": "p", "response": " r"},
    {"prompt": "", "response": "x", "label": 1, "client": 0},
    {"instruction": "do", "output": "done", "client": "acme"},
    {"instruction": "do", "input": "it", "output": "done", "label": "a"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
])
LAYOUT_KEYS = ["prompt", "response", "instruction", "input", "output", "messages", "label", "client", "text"]
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
FIELD_VALUES = st.one_of(VALUES, st.text(SURROGATE, min_size=1, max_size=2),
                         st.lists(st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), VALUES,
                                                  max_size=3), max_size=3))
ROWS = st.dictionaries(st.sampled_from(LAYOUT_KEYS), FIELD_VALUES, max_size=4)


def no_newline(s: bytes) -> bytes:
    return s.replace(b"\n", b" ").replace(b"\r", b" ")


LINES = st.one_of(
    GOOD_ROWS.map(lambda r: ("good", json.dumps(r).encode())),
    ROWS.map(lambda r: ("row", json.dumps(r).encode())),
    VALUES.map(lambda v: ("value", json.dumps(v).encode())),
    st.text(max_size=20).map(lambda t: ("text", no_newline(t.encode("utf-8")))),
    st.binary(max_size=20).map(lambda b: ("bytes", no_newline(b))),
    st.sampled_from([("blank", b""), ("blank", b"   "), ("deep", b"[" * 3000 + b"]" * 3000),
                     ("bigint", b'{"prompt": "x", "response": "y", "label": ' + b"9" * 5000 + b"}"),
                     ("surrogate", b'{"prompt": "\\udc00", "response": "y"}'),
                     ("bom", b"\xef\xbb\xbf" + b'{"prompt": "x", "response": "y"}')]),
)
WHERE = re.compile(r"^(?P<path>.*?):(?P<line>\d+): ")


@props(1000)
@given(lines=st.lists(LINES, min_size=1, max_size=6))
def test_jsonl_lines_load_or_name_the_first_bad_file_line(tmp_path, lines):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\n".join(b for _, b in lines) + b"\n")
    before = snapshot(tmp_path)
    try:
        rows = read_jsonl(str(path))
    except DataError as e:
        msg = str(e)
        m = WHERE.match(msg)
        if m is None:  # no line to name: the file itself
            assert msg.startswith(f"{path}: no rows"), msg
        else:
            assert m["path"] == str(path), msg
            n = int(m["line"])
            assert 1 <= n <= len(lines) and lines[n - 1][0] not in ("good", "blank"), (n, lines, msg)
            # every line before it is fine: the error names the first bad line
            path.write_bytes(b"".join(b + b"\n" for _, b in lines[:n - 1]))
            try:
                read_jsonl(str(path))
            except DataError as e2:
                assert str(e2) == f"{path}: no rows (the file is empty or only blank lines)", (lines, msg, str(e2))
    else:
        assert len(rows) >= sum(k == "good" for k, _ in lines)
        # what loads also tokenises: nothing a loaded row holds breaks the encoder
        collate(ByteTokenizer(), [r.example for r in rows], max_len=4096)
    assert snapshot(tmp_path).keys() == before.keys()


CLIENT_IDS = st.one_of(st.none(), st.integers(-1, 4), st.sampled_from(["acme", "beta", "", "Zed"]))


@props(400)
@given(rows=st.lists(st.tuples(GOOD_ROWS, CLIENT_IDS, st.one_of(st.none(), st.sampled_from(["a", "b", 3]))),
                     min_size=1, max_size=30),
       files=st.integers(1, 3), clients=st.integers(1, 3), partition=st.sampled_from(["iid", "dirichlet", "field"]),
       alpha=st.sampled_from([0.01, 1.0, 100.0]), fewshot=st.integers(0, 3))
def test_client_ids_labels_and_partitions_load_or_name_the_file(tmp_path, rows, files, clients, partition, alpha, fewshot):
    paths = []
    for f in range(files):
        lines = []
        for i, (row, client, label) in enumerate(rows):
            if i % files != f:
                continue
            row = {k: v for k, v in row.items() if k not in ("client", "label")}
            row.update({k: v for k, v in (("client", client), ("label", label)) if v is not None})
            lines.append(json.dumps(row))
        paths.append(tmp_path / f"c{f}.jsonl")
        paths[-1].write_text("".join(l + "\n" for l in lines))
    before = snapshot(tmp_path)
    cfg = DataConfig(source="jsonl", files=[str(p) for p in paths], partition=partition, alpha=alpha,
                     fewshot_rows=fewshot, test_fraction=0.2)
    try:
        out = load_clients(cfg, clients, seed=0)
    except DataError as e:
        msg = str(e)
        assert any(str(p) in msg for p in paths) or msg.startswith("data.files has"), msg
    else:
        assert len(out) == clients
        for c in out:
            check_responses_fit(ByteTokenizer(), c, max_len=64)
    assert snapshot(tmp_path) == before


@props(30)
@given(rows=st.lists(ROWS, min_size=1, max_size=4))
def test_datasets_read_through_hf_load_or_name_the_path_and_leave_nothing(tmp_path, rows):
    from fdlora_cluster.data.hf import read_dataset

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp = set(Path(tempfile.gettempdir()).glob("fdlora-hf-*"))
    try:
        read_dataset(str(path))
    except DataError as e:
        assert str(e).startswith(str(path)), str(e)
    assert set(Path(tempfile.gettempdir()).glob("fdlora-hf-*")) == tmp  # the throwaway cache is gone


# ------------------------------------------------------------------ what the generated input found, pinned


@pytest.mark.parametrize("path, value, match", [
    ("model.config.model_type", [1], r"model\.config\.model_type = \[1\] is not a causal LM type"),
    ("topology", {"num_clients": 10**9, "ranks_per_client": 1}, r"topology: 1000000000 client ranks; at most 1048576"),
    ("client_overrides", {0.5: {"inner_steps": 1}}, r"client_overrides key 0\.5 must be an integer"),
    ("client_overrides", {True: {"inner_steps": 1}}, r"client_overrides key True must be an integer"),
    ("deepspeed.bfloat16", 3, r"deepspeed \(client 0\): bfloat16 must be a mapping such as \{enabled: true\}, got 3"),
    ("deepspeed.bf16.enabled", [1], r"deepspeed \(client 0\): bf16\.enabled = \[1\] must be true or false"),
    ("include", "missing.yaml", r"c\.yaml: include: file .*missing\.yaml not found"),
    ("client_overrides", {"9" * 5000: {}}, r"client_overrides key '9999.*' must be an integer"),
])
def test_found_config_values_are_config_errors(demo, workdir, path, value, match):
    raw = copy.deepcopy(demo)
    set_path(raw, path, value)
    (workdir / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=match):
        check_environment(load_config(workdir / "c.yaml"))


@pytest.mark.parametrize("text, match", [
    ("seed: " + "[" * 5000, r"c\.yaml: nested too deeply to read"),
    ("seed: " + "9" * 5000, r"c\.yaml: not valid YAML: a value cannot be read \(Exceeds the limit \(4300 digits\)"),
    ("seed: 2001-13-45", r"c\.yaml: not valid YAML: a value cannot be read \(month must be in 1\.\.12\)"),
    ("seed: !!int x", r"c\.yaml: not valid YAML: a value cannot be read \(invalid literal for int"),
    ("seed: 0x" + "f" * 4000, r"c\.yaml: holds an integer of 16000 bits; no setting takes one that large"),
    ("? 0x" + "f" * 4000 + "\n: 1\n", r"c\.yaml: holds an integer of 16000 bits"),  # as a key
    ("a: &a [*a]\nseed: *a\n", r"c\.yaml: expands to more than 100000 values \(YAML aliases"),
])
def test_found_config_files_are_config_errors(workdir, text, match):
    (workdir / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(workdir / "c.yaml")


@pytest.mark.parametrize("item, match", [
    ("train.rounds=[", r"--set 'train\.rounds=\[': not valid YAML: while parsing a flow node"),
    ("seed=" + "[" * 5000 + "]" * 5000, r"--set 'seed=\[\[\[.*': nested too deeply to read"),
])
def test_found_overrides_are_config_errors(item, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "demo.yaml", [item])


def test_a_deepspeed_file_that_is_not_utf8_json_is_a_config_error(demo, workdir):
    raw = copy.deepcopy(demo)
    (workdir / "ds.json").write_bytes(b"\xff{}")
    raw["deepspeed"] = str(workdir / "ds.json")
    with pytest.raises(ConfigError, match=r"deepspeed: .*ds\.json is not valid JSON: 'utf-8' codec can't decode byte 0xff"):
        config_from_dict(raw)


@pytest.mark.parametrize("line, match", [
    (b"\x80", r"f\.jsonl:2: not valid UTF-8 \(invalid start byte at byte 1\)"),  # was blamed on line 1
    (b"[" * 3000 + b"]" * 3000, r"f\.jsonl:2: JSON nested too deeply to read"),
    (b'{"prompt": "x", "response": "y", "label": ' + b"9" * 5000 + b"}", r"f\.jsonl:2: not usable JSON \(Exceeds the limit"),
    (b'{"prompt": "\\udc00", "response": "y"}', r"f\.jsonl:2: field 'prompt' holds '\\udc00' at character 0, a lone surrogate"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "y"}]}',
     r"f\.jsonl:2: messages\[0\]: 'content' holds '\\ud800'"),
])
def test_found_lines_are_data_errors_naming_their_line(tmp_path, line, match):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"prompt": "x", "response": "y"}\n' + line + b"\n")
    with pytest.raises(DataError, match=match):
        read_jsonl(str(path))


def test_a_byte_order_mark_at_the_start_is_skipped(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "x", "response": "y"}\n')
    assert read_jsonl(str(path))[0].example.prompt == "x"
