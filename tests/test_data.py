"""Data loading: JSONL errors name file and line; partitions are seeded; splits and tokenisation."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from fdlora_cluster.config import DataConfig
from fdlora_cluster.data import (IGNORE_INDEX, ByteTokenizer, ClientData, DataError, Example, check_responses_fit,
                                 collate, encode_example, load_clients, partition_dirichlet, partition_iid, read_jsonl)

pytestmark = pytest.mark.unit


def write(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(path)


def rows(n, labels=("a", "b", "c"), client=None):
    out = []
    for i in range(n):
        r = {"prompt": f"q{i} ->", "response": f" {labels[i % len(labels)]}", "label": labels[i % len(labels)]}
        if client is not None:
            r["client"] = client(i)
        out.append(r)
    return out


# ------------------------------------------------------------------ reading: errors name file and line


@pytest.mark.parametrize("bad, match", [
    ('{"prompt": "x", "response": ', r"f\.jsonl:3: not valid JSON"),
    ('{"prompt": "x"}', r"f\.jsonl:3: missing field 'response'"),
    ('{"response": " y"}', r"f\.jsonl:3: missing field 'prompt'"),
    ('{"prompt": 1, "response": " y"}', r"f\.jsonl:3: field 'prompt' must be a string"),
    ('[1, 2]', r"f\.jsonl:3: expected a JSON object"),
    ('{"prompt": "x", "response": ""}', r"f\.jsonl:3: field 'response' is empty"),
    ('{"prompt": "x", "response": " y", "client": -1}', r"f\.jsonl:3: field 'client' must be a client name \(a non-empty string\) or index \(an integer >= 0\), got -1"),
    ('{"prompt": "x", "response": " y", "label": [1]}', r"f\.jsonl:3: field 'label' must be a string"),
])
def test_bad_line_names_file_and_line(tmp_path, bad, match):
    good = json.dumps({"prompt": "p", "response": " r"})
    path = write(tmp_path / "f.jsonl", [good, "", bad, good])  # line 2 is blank, and skipped
    with pytest.raises(DataError, match=match):
        read_jsonl(path)


def test_empty_and_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"e\.jsonl: no rows"):
        read_jsonl(str(tmp_path / "e.jsonl"))
    with pytest.raises(DataError, match=r"nope\.jsonl: cannot open"):
        read_jsonl(str(tmp_path / "nope.jsonl"))


def test_rows_keep_label_client_and_line(tmp_path):
    path = write(tmp_path / "f.jsonl", [{"prompt": "p", "response": " r", "label": 3, "client": 1}])
    (row,) = read_jsonl(path)
    assert row.example == Example("p", " r", "3") and row.client == 1 and row.where == f"{path}:1"


# ------------------------------------------------------------------ partitions


def test_iid_is_deterministic_and_balanced():
    a, b, c = partition_iid(101, 4, 0), partition_iid(101, 4, 0), partition_iid(101, 4, 1)
    assert a == b and a != c
    assert sorted(i for p in a for i in p) == list(range(101))
    assert {len(p) for p in a} <= {25, 26}


def _label_share_spread(parts, labels):
    """Mean over clients of the total-variation distance between the client's label mix and the global one."""
    glob = Counter(labels)
    n = len(labels)
    tv = []
    for p in parts:
        cnt = Counter(labels[i] for i in p)
        tv.append(0.5 * sum(abs(cnt[l] / len(p) - glob[l] / n) for l in glob))
    return float(np.mean(tv))


def test_dirichlet_is_deterministic_and_alpha_controls_skew():
    labels = [f"l{i % 5}" for i in range(2000)]
    a = partition_dirichlet(labels, 4, 0.1, seed=3)
    assert a == partition_dirichlet(labels, 4, 0.1, seed=3)
    assert a != partition_dirichlet(labels, 4, 0.1, seed=4)
    assert sorted(i for p in a for i in p) == list(range(2000))  # every row to exactly one client
    skewed = np.mean([_label_share_spread(partition_dirichlet(labels, 4, 0.1, s), labels) for s in range(5)])
    near_iid = np.mean([_label_share_spread(partition_dirichlet(labels, 4, 1000.0, s), labels) for s in range(5)])
    assert skewed > 0.4, skewed    # a few dominant labels per client
    assert near_iid < 0.05, near_iid  # close to the global label mix


def cfg(tmp_path, files, **kw):
    return DataConfig(source="jsonl", files=files, fewshot_rows=2, test_fraction=0.2, **kw)


def test_one_file_split_by_dirichlet_iid_and_field(tmp_path):
    path = write(tmp_path / "all.jsonl", rows(300, client=lambda i: i % 3))
    for how in ("iid", "dirichlet", "field"):
        clients = load_clients(cfg(tmp_path, [path], partition=how, alpha=5.0), 3, seed=0)
        assert len(clients) == 3
        assert sum(len(c.train) + len(c.fewshot) + len(c.test) for c in clients) == 300
        assert all(c.candidates_all == [" a", " b", " c"] for c in clients)
        assert all(set(c.candidates) <= {" a", " b", " c"} and c.candidates for c in clients)
    by_field = load_clients(cfg(tmp_path, [path], partition="field"), 3, seed=0)
    assert all(int(ex.prompt[1:-3]) % 3 == c.client for c in by_field for ex in c.train + c.test)


def test_partition_errors_name_the_file(tmp_path):
    path = write(tmp_path / "all.jsonl", rows(30, labels=("a",)))
    # one label and a tiny alpha: the label's rows go (almost) all to one client
    with pytest.raises(DataError, match=r"all\.jsonl: partition 'dirichlet' left client \d with no rows.*raise data\.alpha"):
        load_clients(cfg(tmp_path, [path], partition="dirichlet", alpha=0.01), 4, seed=0)
    path = write(tmp_path / "nolabel.jsonl", rows(5) + [{"prompt": "p", "response": " r"}])
    with pytest.raises(DataError, match=r"nolabel\.jsonl:6: partition 'dirichlet' needs a 'label'"):
        load_clients(cfg(tmp_path, [path], partition="dirichlet"), 2, seed=0)
    path = write(tmp_path / "field.jsonl", rows(20, client=lambda i: 0 if i != 7 else 5))
    with pytest.raises(DataError, match=r"field\.jsonl:8: client 5 is out of range; the topology has 2 clients"):
        load_clients(cfg(tmp_path, [path], partition="field"), 2, seed=0)
    path = write(tmp_path / "field0.jsonl", rows(20, client=lambda i: 0))
    with pytest.raises(DataError, match=r"field0\.jsonl: partition 'field' left client 1 with no rows"):
        load_clients(cfg(tmp_path, [path], partition="field"), 2, seed=0)


def test_per_client_files_and_small_client(tmp_path):
    a = write(tmp_path / "a.jsonl", rows(40))
    b = write(tmp_path / "b.jsonl", rows(3))
    with pytest.raises(DataError, match=r"b\.jsonl: client 1 has 3 rows; it needs more than test \(1\) \+ few-shot \(2\)"):
        load_clients(cfg(tmp_path, [a, b]), 2, seed=0)
    b = write(tmp_path / "b.jsonl", rows(40, labels=("x", "y")))
    c0, c1 = load_clients(cfg(tmp_path, [a, b]), 2, seed=0)
    assert (len(c0.test), len(c0.fewshot), len(c0.train)) == (8, 2, 30)
    # accuracy scores each client among its own labels; accuracy_all among every client's
    assert (c0.candidates, c1.candidates) == ([" a", " b", " c"], [" x", " y"])
    assert c0.candidates_all == c1.candidates_all == [" a", " b", " c", " x", " y"]


def test_splits_are_seeded_and_disjoint(tmp_path):
    path = write(tmp_path / "all.jsonl", rows(200))
    c = cfg(tmp_path, [path])
    a, b = load_clients(c, 2, seed=0), load_clients(c, 2, seed=0)
    assert a == b and a != load_clients(c, 2, seed=1)
    for cl in a:
        ids = [ex.prompt for ex in cl.train + cl.fewshot + cl.test]
        assert len(ids) == len(set(ids))


def test_unlabelled_or_free_text_is_loss_only(tmp_path):
    free = [{"prompt": f"q{i}", "response": f" answer {i}"} for i in range(40)]
    (c,) = load_clients(cfg(tmp_path, [write(tmp_path / "f.jsonl", free)]), 1, seed=0)
    assert c.candidates == []


# ------------------------------------------------------------------ tokenisation


def test_prompt_tokens_are_masked_out_of_the_loss():
    tok = ByteTokenizer()
    ids, labels = encode_example(tok, Example("ab =>", " ok"), max_len=32)
    assert ids == list(b"ab =>") + list(b" ok") + [tok.eos_id]
    assert labels == [IGNORE_INDEX] * 5 + list(b" ok") + [tok.eos_id]
    # too long: the prompt loses tokens from the left; the response stays whole
    ids, labels = encode_example(tok, Example("x" * 50, " ok"), max_len=10)
    assert len(ids) == 10 and labels[-4:] == list(b" ok") + [tok.eos_id]
    batch = collate(tok, [Example("a", " b"), Example("abc", " d")], max_len=16)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].sum().item() == 4 + 6
    assert (batch["labels"][0, 4:] == IGNORE_INDEX).all()


def test_generator_source_through_load_clients():
    d = DataConfig(source="generator", rows_per_client=60, fewshot_rows=4)
    a = load_clients(d, 3, seed=0)
    assert a == load_clients(d, 3, seed=0)
    assert [len(c.test) for c in a] == [12, 12, 12]
    assert all(c.candidates == [" abnormal", " normal"] for c in a)
    assert load_clients(d.model_copy(update={"skew": 0.3}), 3, seed=0) != a


def test_a_response_too_long_for_max_seq_len_fails_before_training():
    tok = ByteTokenizer()
    ok = Example("p", " ok")
    data = ClientData(client=1, train=[ok], fewshot=[ok], test=[ok, Example("p", " far too long a response")])
    with pytest.raises(DataError, match=r"client 1: a test response of 25 tokens .* train.max_seq_len = 8"):
        check_responses_fit(tok, data, max_len=8)
    check_responses_fit(tok, data, max_len=32)  # fits: no error


def test_preloaded_clients_are_handed_to_the_next_identical_load_once():
    """`run` reads the data on each client rank before the job starts (cli._before_start); the
    trainer's load_clients then takes those rows, and a later load reads the data again."""
    from fdlora_cluster.data import load_clients, preload_clients

    d = DataConfig(source="generator", rows_per_client=30, fewshot_rows=2)
    first = preload_clients(d, 2, 0)
    assert load_clients(d, 3, 0) is not first  # other arguments: read, and the preloaded rows stay
    assert load_clients(d, 2, 0) is first
    again = load_clients(d, 2, 0)
    assert again is not first and [c.train for c in again] == [c.train for c in first]
