"""Data as people have it: client names, instruction and chat rows, local Hugging Face datasets.

Each layout and source has its errors tested with the file and line (or row) they name.
"""

from __future__ import annotations

import json
import logging
import random

import pytest

from fdlora_cluster.config import ConfigError, DataConfig, check_environment, config_from_dict
from fdlora_cluster.data import (IGNORE_INDEX, ByteTokenizer, ClientData, DataError, Example, HFTokenizer,
                                 check_responses_fit, describe_clients, encode_example, load_clients, read_jsonl)
from fdlora_cluster.data.formats import ALPACA, ALPACA_INPUT
from fdlora_cluster.data.hf import read_dataset

from test_data import rows, write

pytestmark = pytest.mark.unit


def cfg(files, **kw):
    kw.setdefault("source", "jsonl")
    return DataConfig(files=[str(f) for f in files], fewshot_rows=2, test_fraction=0.2, **kw)


def read_one(tmp_path, line) -> Example:
    (row,) = read_jsonl(write(tmp_path / "f.jsonl", [line]))
    return row.example


# ------------------------------------------------------------------ client names


def test_per_client_files_may_name_their_client(tmp_path, caplog):
    a = write(tmp_path / "a.jsonl", rows(20, client=lambda i: "zeta"))
    b = write(tmp_path / "b.jsonl", rows(20))  # the field is optional with one file per client
    with caplog.at_level(logging.INFO, logger="fdlora"):
        c0, c1 = load_clients(cfg([a, b]), 2, seed=0)
    # one file per client: the files' order decides the indices, whatever the names
    assert (c0.name, c1.name) == ("zeta", None)
    assert "data: client names -> indices: client 0 = 'zeta', client 1" in caplog.text


@pytest.mark.parametrize("b_client, match", [
    (lambda i: "beta" if i != 4 else "gamma", r"b\.jsonl:5: client 'gamma', but .*b\.jsonl:1 gives 'beta' \(with one file per client"),
    (lambda i: 0 if i == 2 else None, r"b\.jsonl:3: client 0, but this file is data\.files\[1\], client 1's"),
    (lambda i: "acme", r"b\.jsonl: client 'acme' is also the client of .*a\.jsonl"),
])
def test_a_client_field_must_agree_with_its_file(tmp_path, b_client, match):
    a = write(tmp_path / "a.jsonl", rows(20, client=lambda i: "acme"))
    b_rows = rows(20, client=b_client)
    for r in b_rows:
        if r["client"] is None:
            del r["client"]
    b = write(tmp_path / "b.jsonl", b_rows)
    with pytest.raises(DataError, match=match):
        load_clients(cfg([a, b]), 2, seed=0)


def test_partition_field_maps_names_in_sorted_order_whatever_the_row_order(tmp_path):
    names = ["acme", "Zed", "beta"]  # sorted: 'Zed' < 'acme' < 'beta' (Python's string order)
    data = rows(90, client=lambda i: names[i % 3])
    for r in data:
        r["prompt"] = f"{r['client']}:{r['prompt']}"
    shuffled = list(data)
    random.Random(0).shuffle(shuffled)
    for order in (data, shuffled):
        clients = load_clients(cfg([write(tmp_path / "all.jsonl", order)], partition="field"), 3, seed=0)
        assert [c.name for c in clients] == ["Zed", "acme", "beta"]
        assert all(ex.prompt.startswith(c.name + ":") for c in clients for ex in c.train + c.test)
    assert describe_clients(clients) == "client 0 = 'Zed', client 1 = 'acme', client 2 = 'beta'"


@pytest.mark.parametrize("client, n, match", [
    (lambda i: "acme" if i != 6 else 1, 2, r"all\.jsonl:7: client 1, but .*all\.jsonl:1 gives 'acme'; one file names its clients by index"),
    (lambda i: ["a", "b", "c"][i % 3], 2, r"all\.jsonl: 3 client names but the topology has 2 clients; every client needs one "
                                          r"name: 'a' \(first at .*all\.jsonl:1\), 'b' \(first at .*all\.jsonl:2\), 'c'"),
    (lambda i: "a", 2, r"all\.jsonl: 1 client names but the topology has 2 clients"),
])
def test_partition_field_name_errors(tmp_path, client, n, match):
    path = write(tmp_path / "all.jsonl", rows(30, client=client))
    with pytest.raises(DataError, match=match):
        load_clients(cfg([path], partition="field"), n, seed=0)


# ------------------------------------------------------------------ instruction rows (Alpaca)


def test_instruction_rows_use_the_alpaca_prompt_and_keep_accuracy(tmp_path):
    ex = read_one(tmp_path, {"instruction": "Classify.", "input": "disk panic", "output": "abnormal", "label": "x"})
    assert ex == Example(ALPACA_INPUT.format(instruction="Classify.", input="disk panic"), "abnormal", "x")
    assert ex.prompt.endswith("### Input:\ndisk panic\n\n### Response:\n")
    # without input (or with an empty one) the prompt has no Input section
    assert read_one(tmp_path, {"instruction": "Say hi.", "output": "hi"}).prompt == ALPACA.format(instruction="Say hi.")
    assert read_one(tmp_path, {"instruction": "Say hi.", "input": "", "output": "hi"}).prompt == ALPACA.format(instruction="Say hi.")
    # labelled instruction rows are scored for accuracy like prompt/response rows
    data = [{"instruction": f"Classify {i}.", "output": ["yes", "no"][i % 2], "label": i % 2} for i in range(30)]
    (c,) = load_clients(cfg([write(tmp_path / "i.jsonl", data)]), 1, seed=0)
    assert c.candidates == ["no", "yes"]
    tok = ByteTokenizer()
    ids, labels = encode_example(tok, c.train[0], max_len=512)
    assert [i for i in labels if i != IGNORE_INDEX] == list(c.train[0].response.encode()) + [tok.eos_id]


# ------------------------------------------------------------------ chat rows


def chat(*turns, **extra):
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)], **extra}


def test_chat_rows_without_a_template_use_the_plain_fallback_loss_on_assistant_turns_only(tmp_path):
    row = chat("is panic bad?", "yes", "and read?", "no")
    row["messages"].insert(0, {"role": "system", "content": "one word"})
    ex = read_one(tmp_path, row)
    assert ex.prompt == "system: one word\nuser: is panic bad?\nassistant: yes\nuser: and read?\nassistant: "
    assert ex.response == "no"
    tok = ByteTokenizer()
    ids, labels = encode_example(tok, ex, max_len=256)
    text = "system: one word\nuser: is panic bad?\nassistant: "
    second = "user: and read?\nassistant: "
    assert ids == list(text.encode()) + list(b"yes") + [tok.eos_id] + list(second.encode()) + list(b"no") + [tok.eos_id]
    trained = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert trained == list(b"yes") + [tok.eos_id] + list(b"no") + [tok.eos_id]
    # too long: tokens go from the left; the last assistant turn stays whole
    ids, labels = encode_example(tok, ex, max_len=8)
    assert len(ids) == 8 and labels[-3:] == list(b"no") + [tok.eos_id]


def test_chat_rows_are_loss_only_even_with_labels(tmp_path):
    data = [chat(f"q{i}", ["yes", "no"][i % 2], label=i % 2) for i in range(30)]
    (c,) = load_clients(cfg([write(tmp_path / "c.jsonl", data)]), 1, seed=0)
    assert c.candidates == [] and c.train[0].messages is not None


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_tokenizer(path, template: str | None) -> HFTokenizer:
    """A byte-level Hugging Face tokenizer built here (no download), with `template` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(str(path))
    return HFTokenizer(str(path))


def test_chat_rows_with_the_tokenizers_template_train_on_its_assistant_turns(tmp_path, caplog):
    tok = hf_tokenizer(tmp_path / "tok", CHATML)
    ex = read_one(tmp_path, chat("hello", "hi", "bye", "ciao"))
    ids, labels = encode_example(tok, ex, max_len=256)
    assert tok.decode(ids) == ("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
                               "<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\nciao<|im_end|>\n")
    # trained: each assistant turn as the template renders it, its end-of-turn marker included
    spans, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            spans, cur = spans + [cur], []
    spans += [cur] if cur else []
    assert [tok.decode(s) for s in spans] == ["hi<|im_end|>\n", "ciao<|im_end|>\n"]
    data = ClientData(client=0, train=[ex], fewshot=[], test=[])
    with caplog.at_level(logging.INFO, logger="fdlora"):
        check_responses_fit(tok, data, max_len=256)
    assert "chat rows rendered with the tokenizer's chat template" in caplog.text
    plain = hf_tokenizer(tmp_path / "plain", None)  # a tokenizer without a template: the fallback, said so
    with caplog.at_level(logging.INFO, logger="fdlora"):
        check_responses_fit(plain, data, max_len=256)
    assert "the plain fallback template (the tokenizer has no chat template" in caplog.text
    assert plain.decode(encode_example(plain, ex, 256)[0]).startswith("user: hello\nassistant: hi<|endoftext|>")


@pytest.mark.parametrize("template, match", [
    ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message first') }}{% endif %}" + CHATML,
     r"c\.jsonl:2: the tokenizer's chat template refuses this conversation \(.*a system message first\)"),
    ("{{ messages | length }} messages\n" + CHATML,
     r"c\.jsonl:2: the tokenizer's chat template does not render this conversation turn by turn"),
])
def test_a_chat_template_that_cannot_render_a_row_fails_at_start_naming_it(tmp_path, template, match):
    tok = hf_tokenizer(tmp_path / "tok", template)
    path = write(tmp_path / "c.jsonl", [chat("a", "b")] * 2)
    ex = read_jsonl(path)[1].example
    with pytest.raises(DataError, match=match):
        check_responses_fit(tok, ClientData(client=0, train=[ex], fewshot=[], test=[]), max_len=256)


def test_a_too_long_last_assistant_turn_is_named_at_start(tmp_path):
    path = write(tmp_path / "c.jsonl", [chat("q", "short"), chat("q", "a reply far too long to fit")])
    long = read_jsonl(path)[1].example
    with pytest.raises(DataError, match=r"c\.jsonl:2: client 3: a test response of 28 tokens .* train\.max_seq_len = 16"):
        check_responses_fit(ByteTokenizer(), ClientData(client=3, train=[], fewshot=[], test=[long]), max_len=16)


@pytest.mark.parametrize("row, match", [
    ({"messages": []}, r"f\.jsonl:1: field 'messages' must be a non-empty list"),
    ({"messages": "hi"}, r"f\.jsonl:1: field 'messages' must be a non-empty list"),
    ({"messages": [{"from": "human", "value": "hi"}]}, r"f\.jsonl:1: messages\[0\] must be an object with 'role' and "
                                                        r"'content' \(ShareGPT's from/value is not read"),
    ({"messages": [{"role": "user", "content": 3}]}, r"f\.jsonl:1: messages\[0\]: 'content' must be a string, got int"),
    ({"messages": [{"role": "", "content": "x"}]}, r"f\.jsonl:1: messages\[0\]: 'role' must be a non-empty string"),
    (chat("q", ""), r"f\.jsonl:1: messages\[1\]: an assistant turn is empty"),
    (chat("q", "a", "and?"), r"f\.jsonl:1: the last message must be the assistant's .* ends with a 'user' message"),
    ({"instruction": "x"}, r"f\.jsonl:1: missing field 'output' \(a instruction row needs 'instruction' and 'output'\)"),
    ({"input": "x", "output": "y"}, r"f\.jsonl:1: missing field 'instruction'"),
    ({"instruction": "x", "output": ""}, r"f\.jsonl:1: field 'output' is empty"),
    ({"instruction": "x", "input": 2, "output": "y"}, r"f\.jsonl:1: field 'input' must be a string, got int"),
    ({"prompt": "x", "output": "y"}, r"f\.jsonl:1: the row mixes layouts \(prompt/response and instruction\)"),
    ({"text": "x"}, r"f\.jsonl:1: no known layout; a row needs \"prompt\" and \"response\", or \"instruction\" and "
                    r"\"output\" \(Alpaca\), or \"messages\" \(chat\); it has \['text'\]"),
    ({"prompt": "x", "response": "y", "client": ""}, r"f\.jsonl:1: field 'client' must be a client name"),
    ({"prompt": "x", "response": "y", "client": True}, r"f\.jsonl:1: field 'client' must be a client name"),
])
def test_bad_rows_of_every_layout_name_file_and_line(tmp_path, row, match):
    with pytest.raises(DataError, match=match):
        read_one(tmp_path, row)


# ------------------------------------------------------------------ local Hugging Face datasets


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    """The same 40 rows (two named clients, mixed layouts) as JSON, JSONL, Parquet, Arrow and save_to_disk."""
    import datasets

    datasets.disable_progress_bars()
    d = tmp_path_factory.mktemp("hf")
    data = [{"prompt": f"q{i}", "response": " a", "client": "acme"} if i % 2 else
            {"instruction": f"do {i}", "output": "done", "client": "beta"} for i in range(40)]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (d / "rows.json").write_text(json.dumps(data))
    keys = sorted({k for r in data for k in r})  # Arrow columns: a key a row lacks is null there
    ds = datasets.Dataset.from_dict({k: [r.get(k) for r in data] for k in keys})
    ds.to_parquet(str(d / "rows.parquet"))
    ds.save_to_disk(str(d / "saved"))
    (d / "rows.arrow").write_bytes(next((d / "saved").glob("*.arrow")).read_bytes())
    datasets.DatasetDict({"train": ds, "test": ds.select(range(10))}).save_to_disk(str(d / "splits"))
    return d, data


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.parquet", "rows.arrow", "saved"])
def test_every_local_dataset_kind_reads_the_same_rows(datasets_dir, name):
    d, data = datasets_dir
    got = read_dataset(str(d / name))
    want = read_jsonl(str(d / "rows.jsonl"))
    assert [r.example for r in got] == [r.example for r in want] and [r.client for r in got] == [r.client for r in want]
    assert got[3].where == f"{d / name} row 3"  # 0-based row index: ds[3]
    clients = load_clients(cfg([d / name], source="hf", partition="field"), 2, seed=0)
    assert [c.name for c in clients] == ["acme", "beta"] and sum(len(c.train) + len(c.fewshot) + len(c.test) for c in clients) == 40


def test_a_dataset_with_splits_needs_data_split(datasets_dir):
    d, _ = datasets_dir
    with pytest.raises(DataError, match=r"splits: a dataset with splits \['test', 'train'\]; set data\.split to one of them$"):
        read_dataset(str(d / "splits"))
    with pytest.raises(DataError, match=r"set data\.split to one of them \(data\.split = 'dev'\)"):
        read_dataset(str(d / "splits"), "dev")
    assert len(read_dataset(str(d / "splits"), "test")) == 10


def test_dataset_errors_name_the_path_and_row(tmp_path):
    import datasets

    bad = [{"prompt": "x", "response": " y"}] * 5 + [{"prompt": "x", "response": ""}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(DataError, match=r"b\.parquet row 5: field 'response' is empty"):
        read_dataset(str(tmp_path / "b.parquet"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x", "response": " y"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: the datasets library cannot read it \(ArrowInvalid: JSON parse error"):
        read_dataset(str(tmp_path / "broken.jsonl"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: the datasets library cannot read it \(ArrowInvalid"):
        read_dataset(str(tmp_path / "junk.parquet"))
    with pytest.raises(DataError, match=r"x\.csv: not a dataset this reads; give a \.json, \.jsonl, \.parquet, \.arrow file"):
        read_dataset(str(tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: the datasets library cannot read it \(FileNotFoundError"):
        read_dataset(str(tmp_path / "empty"))


def test_without_the_datasets_library_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # `import datasets` now fails
    path = write(tmp_path / "f.jsonl", rows(10))
    with pytest.raises(DataError, match=r"f\.jsonl: data\.source 'hf' reads datasets with the `datasets` library, which "
                                        r"is not installed: pip install 'fdlora-cluster\[hf\]'"):
        read_dataset(path)
    from test_config import demo_raw

    raw = demo_raw()
    raw["data"] = {"source": "hf", "files": [path]}
    raw["topology"] = {"clients": [1]}
    with pytest.raises(ConfigError, match=r"data\.source = 'hf' reads datasets with the `datasets` library, which is not installed"):
        check_environment(config_from_dict(raw))


def test_the_config_takes_hf_files_and_save_to_disk_directories(datasets_dir, tmp_path):
    from test_config import demo_raw

    d, _ = datasets_dir
    raw = demo_raw()
    raw["data"] = {"source": "hf", "files": [str(d / "saved"), str(d / "rows.parquet")], "split": "train"}
    assert config_from_dict(raw).data.files == [str(d / "saved"), str(d / "rows.parquet")]
    raw["data"]["files"] = [str(d / "saved"), str(tmp_path / "gone")]
    with pytest.raises(ConfigError, match=r"data\.files: .*gone not found"):
        config_from_dict(raw)
    raw["data"] = {"source": "jsonl", "files": [str(d / "saved"), str(d / "rows.jsonl")]}  # jsonl reads files only
    with pytest.raises(ConfigError, match=r"data\.files: .*saved not found"):
        config_from_dict(raw)
