"""Privacy, for every strategy (issue 9, point 5): the payload tap on the server and every leader
records every message sent on the federation communicator (Transport.record, the bytes on the
wire included); no message carries the personal adapter's start or any value its training gave
it, at any round, nor any data row (a value the personal adapter copied from the global one,
Ditto's start or FDLoRA's sync every H rounds, came from the server and is not checked). `local` holds a transport too, and it sends nothing.
Every strategy's tapped run is shared with its result and schedule tests (conftest.strategy_run)."""

import json

import pytest
import torch

from fdlora_cluster.data import load_clients

from conftest import STRATEGIES

pytestmark = pytest.mark.job


def tensors_bytes(values: list[dict]) -> list[bytes]:
    """The distinct non-zero tensors among the personal adapter's values, as raw bytes (a zero
    tensor, LoRA B's start, is what every adapter starts from and proves nothing)."""
    seen = {}
    for state in values:
        for t in state.values():
            if t.any():
                seen[t.contiguous().view(torch.uint8).numpy().tobytes()] = True
    return list(seen)


# Every strategy's one tapped run (conftest.strategy_run: 1 server + two one-rank clients, leaders
# ranks 1 and 2); fdlora_paper is the `global.init: personal_mean` case.
@pytest.mark.parametrize("name", STRATEGIES)
def test_no_message_carries_a_personal_adapter_or_a_data_row(strategy_run, name):
    run = strategy_run(name)
    cfg, out = run.cfg, run.out
    messages = [m for r in range(3) for m in torch.load(out / f"payloads-rank-{r}.pt")]
    federated = cfg.strategy != "local"

    for leader, client in ((1, 0), (2, 1)):
        values = torch.load(out / f"personal-rank-{leader}.pt")  # [start, after each personal phase...]
        personal = tensors_bytes(values)
        assert personal, "every personal value is zero: the check below would prove nothing"
        for kind, dest, state, _, wire in messages:
            if kind == "init" and cfg.global_.init == "personal_mean" and state is not None:
                # the one documented exception (the paper's Algorithm 1, line 7): each leader sends
                # its stage-1 personal adapter to the server once, to start the global one as their mean
                continue
            for p in personal:
                assert p not in wire, f"a {kind} message carries a value of client {client}'s personal adapter"
            for k, v in (state or {}).items():
                assert not any(torch.equal(v, s[k]) and v.any() for s in values if k in s), (kind, k)
        if cfg.global_.init == "personal_mean":
            inits = [s for kind, dest, s, _, _ in messages if kind == "init" and s is not None]
            stage1 = values[1]
            assert len(inits) == 2 and any(all(torch.equal(s[k], stage1[k]) for k in stage1) for s in inits)

    rows = load_clients(cfg.data, 2, cfg.seed)
    texts = {ex.prompt.encode() for c in rows for split in (c.train, c.fewshot, c.test) for ex in split}
    for kind, dest, state, _, wire in messages:
        assert not any(t in wire for t in texts if len(t) >= 12), f"a {kind} message carries a data row"

    summary = json.loads((run.dir / "summary.json").read_text())
    if federated:
        assert {m[0] for m in messages} >= {"layout", "global", "final", "update", "bye"}
    else:
        assert messages == [], [m[0] for m in messages]
        assert [c["bytes_total"] for c in summary["clients"]] == [0, 0]
        assert summary["server"]["bytes_total"]["messages_sent"] == 0
