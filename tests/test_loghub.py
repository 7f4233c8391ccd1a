"""bench/loghub.py's task builder on real LogHub-2k lines (tests/loghub_mini, a few lines of each
system, so that a clean clone without ../shared/data runs it): the files parse as the trainer reads
them, labels per client are as designed, no test line repeats a training line in the trainer's own
split, and bad input names the file."""

import collections
import csv
import os
import sys

import pytest

from fdlora_cluster.config import load_config
from fdlora_cluster.data import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import compare  # noqa: E402
import loghub  # noqa: E402

pytestmark = pytest.mark.unit
MINI = os.path.join(ROOT, "tests", "loghub_mini")
SYSTEMS = ["Android", "Apache", "BGL", "Hadoop"]
# the fixture's distinct messages per normalised level (README there); min_label 5 drops the 2-3 line ones
DESIGNED = {"Android": ["info", "warning"], "Apache": ["error", "info"], "BGL": ["error", "info"],
            "Hadoop": ["error", "info", "warning"]}


def test_task_files_parse_with_the_designed_labels(tmp_path):
    task = loghub.build_task(MINI, SYSTEMS, str(tmp_path), per_label=4, min_label=5, max_chars=80)
    assert [c["system"] for c in task["clients"]] == SYSTEMS
    for info, path in zip(task["clients"], task["files"]):
        rows = read_jsonl(path)  # the trainer's reader: every row a prompt/response row with a label
        counts = collections.Counter(r.example.label for r in rows)
        assert sorted(counts) == DESIGNED[info["system"]] == info["labels"]
        assert set(counts.values()) == {4}, counts  # balanced: a few rows per label
        assert {r.example.response for r in rows} == {f" {label}" for label in counts}
        assert {r.client for r in rows} == {info["system"]}
        prompts = [r.example.prompt for r in rows]
        assert len(set(prompts)) == len(prompts)
        assert all(p.startswith("log: ") and p.endswith(" =>") and len(p) <= 80 + 8 for p in prompts)
    dropped = {c["system"]: c["dropped_labels"] for c in task["clients"]}
    assert dropped == {"Android": ["error"], "Apache": [], "BGL": ["warning"], "Hadoop": []}


def test_no_test_line_repeats_a_training_line_in_the_trainers_split(tmp_path):
    # the fixture repeats a message in every system: the builder keeps it once
    for system in SYSTEMS:
        with open(loghub.system_file(MINI, system), newline="", encoding="utf-8") as f:
            contents = [r["Content"] for r in csv.DictReader(f)]
        assert len(set(contents)) < len(contents)
    task = loghub.build_task(MINI, SYSTEMS, str(tmp_path), per_label=6, min_label=5, max_chars=80)
    # BGL's six error messages are five once cut to 80 characters: distinct as the model sees them
    assert [c["rows_per_label"] for c in task["clients"]] == [6, 6, 5, 6]
    own = loghub.setting(task, "tiny", str(tmp_path), test_fraction=0.4, fewshot_rows=2, max_seq_len=120)
    for seed in range(5):
        splits = loghub.check_split(own["data"], len(SYSTEMS), seed, None, 120)
        for s, system, info in zip(splits, SYSTEMS, task["clients"]):
            assert s["name"] == system and s["candidates"] == [f" {x}" for x in DESIGNED[system]]
            assert s["train"] + s["fewshot"] + s["test"] == info["rows_per_label"] * len(DESIGNED[system])
            assert 1 / len(DESIGNED[system]) <= s["majority_rate"] < 1


def test_the_check_catches_a_repeated_line_and_a_row_that_would_be_cut(tmp_path):
    task = loghub.build_task(MINI, SYSTEMS, str(tmp_path), per_label=4, min_label=5, max_chars=80)
    own = loghub.setting(task, "tiny", str(tmp_path), test_fraction=0.4, fewshot_rows=2, max_seq_len=120)
    with open(task["files"][1], "a", encoding="utf-8") as f:  # Apache's rows twice: a test line is also trained on
        f.write(open(task["files"][1], encoding="utf-8").read())
    with pytest.raises(AssertionError, match="client 1: .* test lines repeat training lines"):
        loghub.check_split(own["data"], len(SYSTEMS), 0, None, 120)
    with pytest.raises(loghub.TaskError, match="over max_seq_len 40: it would lose its start"):
        loghub.check_split(own["data"], len(SYSTEMS), 0, None, 40)


def test_the_setting_is_a_valid_config_for_every_strategy(tmp_path):
    out = tmp_path / "run"
    assert loghub.main(["--data", MINI, "--out", str(out), "--model", "tiny", "--per-label", "4", "--min-label", "5",
                        "--fewshot-rows", "4", "--seeds", "0", "1", "--build-only"]) == 0
    configs = [os.path.join(ROOT, "configs", f"{s}.yaml") for s in compare.DEFAULT]
    for path in compare.with_setting(configs, str(out / "setting.yaml"), str(tmp_path / "configs")):
        cfg = load_config(path)
        assert cfg.data.source == "jsonl" and cfg.client_sizes() == [1, 1, 1, 1]
        assert [os.path.basename(f) for f in cfg.data.files] == [f"{s}.jsonl" for s in SYSTEMS]


def _write(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_bad_input_names_the_file_and_the_problem(tmp_path):
    d = str(tmp_path)
    with pytest.raises(loghub.TaskError, match=r"Nope_2k\.log_structured\.csv: not found .*--data"):
        loghub.build_task(MINI, ["Android", "Nope"], d)
    path = loghub.system_file(d, "X")
    _write(path, ["LineId", "Level", "Content"], [[1, "INFO", "a"]])
    with pytest.raises(loghub.TaskError, match=r"X_2k\.log_structured\.csv: no column EventId"):
        loghub.read_system(path)
    _write(path, ["LineId", "Level", "Content", "EventId"], [[1, "INFO", "a", "E1"], [2, "INFO", "b"]])
    with pytest.raises(loghub.TaskError, match=r"X_2k\.log_structured\.csv:3: 4 columns in the header"):
        loghub.read_system(path)
    _write(path, ["LineId", "Level", "Content", "EventId"], [[1, "combo", "a", "E1"]])
    with pytest.raises(loghub.TaskError, match=r"X_2k\.log_structured\.csv:2: level 'combo' is not one"):
        loghub.read_system(path)
    with open(path, "wb") as f:
        f.write(b"LineId,Level,Content,EventId\n1,INFO,caf\xe9,E1\n")
    with pytest.raises(loghub.TaskError, match=r"X_2k\.log_structured\.csv: not valid UTF-8"):
        loghub.read_system(path)
    # one level only, and one message at two levels (dropped: it has no single answer)
    _write(path, ["LineId", "Level", "Content", "EventId"],
           [[i, "INFO", f"m{i}", "E1"] for i in range(6)] + [[7, "ERROR", "m0", "E2"]])
    with pytest.raises(loghub.TaskError, match=r"X: .* has 1 level\(s\) with at least 2 distinct messages .*'info': 5"):
        loghub.system_rows(path, "X", 4, 2, 80, 0)
    with pytest.raises(loghub.TaskError, match=r"a system twice"):
        loghub.build_task(MINI, ["BGL", "BGL"], d)
