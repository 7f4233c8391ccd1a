"""The shipped scenario: deterministic by seed, shared and private rules as documented, label skew."""

from __future__ import annotations

from collections import Counter

import pytest

from fdlora_cluster.data import general_text, generate_client_rows
from fdlora_cluster.data import scenario as S

pytestmark = pytest.mark.unit


def event(ex):
    return ex.prompt.split()[2]  # "log: <component> <event> <argument> =>"


def test_generator_is_deterministic_by_seed():
    a = [generate_client_rows(c, 3, 100, seed=0) for c in range(3)]
    assert a == [generate_client_rows(c, 3, 100, seed=0) for c in range(3)]
    assert a != [generate_client_rows(c, 3, 100, seed=1) for c in range(3)]
    assert general_text(50, 0) == general_text(50, 0) != general_text(50, 1)


def test_rules_shared_private_and_conflicting():
    n = 3
    rows = {c: generate_client_rows(c, n, 600, seed=0) for c in range(n)}
    for c, rs in rows.items():
        for ex in rs:
            e = event(ex)
            assert ex.response == " " + ex.label and ex.label in ("normal", "abnormal")
            if e in S.SHARED_ANOMALIES:
                assert ex.label == "abnormal"
            elif e in S.private_events(c):
                assert ex.label == "abnormal"
            else:  # ordinary events and the other systems' private events
                assert ex.label == "normal"
    # the private rules conflict: client 0's private events appear, labelled normal, at client 1
    at_1 = Counter(ex.label for ex in rows[1] if event(ex) in S.private_events(0))
    assert at_1["normal"] > 0 and at_1["abnormal"] == 0


def test_clients_have_label_skew_and_few_examples_per_shared_event():
    rates = []
    for c in range(4):
        rs = generate_client_rows(c, 4, 400, seed=0)
        rates.append(sum(ex.label == "abnormal" for ex in rs) / len(rs))
        shared = Counter(event(ex) for ex in rs if event(ex) in S.SHARED_ANOMALIES)
        # many shared events, so each client has only a handful of examples of each
        assert len(S.SHARED_ANOMALIES) >= 30 and max(shared.values()) < 0.1 * len(rs)
    assert max(rates) - min(rates) > 0.1, rates


def test_pretraining_text_carries_no_client_rule():
    words = {event(ex) for ex in general_text(2000, 0)}
    assert not words & set(S.SHARED_ANOMALIES)
    assert not words & set(S.PRIVATE_ANOMALIES)
    assert words & set(S.PRETRAIN_ANOMALIES)
