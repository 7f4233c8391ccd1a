"""bench/round_parts.py on hand-made records: the federation part of a round, and --group's
table of repeated runs (mean, spread, against the first group)."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SPEC = importlib.util.spec_from_file_location("round_parts", Path(__file__).resolve().parent.parent / "bench" / "round_parts.py")
round_parts = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(round_parts)


def fake_run(path: Path, round_s: float, train_s: float) -> str:
    path.mkdir()
    recs = []
    for k in (1, 2, 3):  # round 1 (start-up) is left out: make it far off
        recs.append({"event": "round", "round": k, "seconds": 100.0 if k == 1 else round_s})
        for c, t in ((0, train_s), (1, train_s / 2)):  # the slowest client's training counts
            recs.append({"event": "train", "round": k, "adapter": "global", "client": c, "seconds": t})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_federation_part_and_groups(tmp_path):
    p = round_parts.round_parts(fake_run(tmp_path / "rp-e100-1", 1.0, 0.9))
    assert p["rounds"] == 2 and p["round_s"] == pytest.approx(1.0) and p["federation_s"] == pytest.approx(0.1)
    runs = [p, round_parts.round_parts(fake_run(tmp_path / "rp-e100-2", 1.2, 0.9)),
            round_parts.round_parts(fake_run(tmp_path / "rp-e1-1", 1.21, 0.9)),
            round_parts.round_parts(fake_run(tmp_path / "rp-e1-2", 1.21, 0.9))]
    table = round_parts.group_table(runs).splitlines()
    assert table[2] == "| rp-e100 | 2 | 1.100 | 1.000-1.200 | +0.0% |"
    assert table[3] == "| rp-e1 | 2 | 1.210 | 1.210-1.210 | +10.0% |"
