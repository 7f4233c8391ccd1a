"""Behaviour pins: short fdlora, fedavg and local runs of the shipped demo config give these exact
adapters. A refactor must leave every digest unchanged; a deliberate change of behaviour updates
them in the same commit and says why.

The digests were taken on main at 88410de (before the round became a plan). Each is the sha256 of
the saved adapter tensors in key order (`adapter_digest`), for the server's global adapter and every
client's personal (and fdlora's fused) adapter.
"""

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_ok, run_job, write_config

pytestmark = pytest.mark.job

SHORT = {"train.rounds": 2, "train.inner_steps": 2, "train.personal_steps": 3, "data.rows_per_client": 60}

PINNED = {
    "fdlora": {"client-0/fused": "8de8f0e42e46857a", "client-0/personal": "96c7bb72aa303ea8",
               "client-1/fused": "90ab0d8822915a6d", "client-1/personal": "1d9015b4b6086136",
               "global": "78af0dce3f657a37"},
    "fedavg": {"client-0/personal": "8f0b7a191060316b", "client-1/personal": "8f0b7a191060316b",
               "global": "3381fc3cc657ab1d"},
    "local": {"client-0/personal": "5322019a044709f4", "client-1/personal": "886ca01c8804855c"},
}


def adapter_digest(directory) -> str:
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_digests(run_dir) -> dict:
    adapters = run_dir / "adapters"
    return {str(p.parent.relative_to(adapters)): adapter_digest(p.parent)
            for p in sorted(adapters.rglob("adapter_model.safetensors"))}


@pytest.mark.parametrize("strategy", ["fdlora", "fedavg", "local"])
def test_shipped_strategies_give_the_pinned_adapters(tmp_path, strategy):
    cfg = write_config(tmp_path, f"{strategy}.yaml" if strategy != "fdlora" else "demo.yaml", **SHORT)
    proc, run_dir = run_job(cfg)
    assert_ok(proc)
    assert run_digests(run_dir) == PINNED[strategy]
