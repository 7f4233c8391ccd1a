"""federation.compress: the codec (pure) and real jobs: true bytes on the wire, and every rank of
every client and the server holding the same global adapter bit for bit."""

import math

import pytest
import torch
from safetensors.torch import load_file

from fdlora_cluster.state import digest
from fdlora_cluster.compress import Codec
from fdlora_cluster.state import add, sub
from fdlora_cluster.transport import HEADER
from fdlora_cluster.state import Layout

from conftest import TINY, assert_ok, read_metrics, run_job, write_config


def change(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 300, generator=g) * 1e-3, "b": torch.randn(7, generator=g), "z": torch.zeros(3, 5)}


@pytest.mark.unit
def test_bf16_is_a_cast_and_halves_the_bytes():
    c = Codec("bf16")
    x = change()
    wire = c.encode(x)
    assert all(w.dtype == torch.bfloat16 for w in wire.values())
    back = c.decode(wire, x)
    assert all(torch.equal(back[k], x[k].to(torch.bfloat16).float()) for k in x)
    full, packed = Layout.of(x), Layout(c.wire_entries(Layout.of(x).entries))
    assert packed.nbytes * 2 == full.nbytes
    assert torch.equal(packed.pack(wire).view(torch.bfloat16)[:4], x["a"].reshape(-1)[:4].to(torch.bfloat16))


@pytest.mark.unit
@pytest.mark.parametrize("block", [0, 64, 256])
def test_int8_error_is_at_most_half_a_step_per_block(block):
    c = Codec("int8", block)
    x = change()
    wire = c.encode(x)
    back = c.decode(wire, x)
    for k, v in x.items():
        n = v.numel()
        size = block or n
        nblocks = math.ceil(n / size)
        assert wire[k].dtype == torch.int8 and wire[k].numel() == nblocks * size
        assert wire[k + ".scale"].numel() == nblocks
        flat = torch.zeros(nblocks * size)
        flat[:n] = v.reshape(-1)
        step = flat.view(nblocks, size).abs().amax(1) / 127  # one quantisation step per block
        err = (back[k] - v).reshape(-1)
        errp = torch.zeros(nblocks * size)
        errp[:n] = err
        assert bool((errp.view(nblocks, size).abs() <= step[:, None] / 2 + 1e-12).all()), k
    assert torch.equal(back["z"], x["z"])  # an all-zero block stays exactly zero
    bytes_ = Layout(c.wire_entries(Layout.of(x).entries)).nbytes
    expected = sum(math.ceil(v.numel() / (block or v.numel())) * ((block or v.numel()) + 4) for v in x.values())
    assert bytes_ == expected


@pytest.mark.unit
def test_error_feedback_carries_what_rounding_lost_to_the_next_send():
    """Sending changes d_1..d_T with error feedback: the decoded sum plus the last residual is the
    true sum (up to float32 addition), while without feedback the rounding error piles up."""
    c = Codec("int8", 64)
    residual, sent, true = None, None, None
    plain = None
    for t in range(20):
        d = change(t)
        true = d if true is None else add(true, d)
        with_r = d if residual is None else add(d, residual)
        wire = c.encode(with_r)
        dec = c.decode(wire, d)
        residual = sub(with_r, dec)
        sent = dec if sent is None else add(sent, dec)
        pd = c.decode(c.encode(d), d)
        plain = pd if plain is None else add(plain, pd)
    for k in true:
        assert torch.allclose(add(sent, residual)[k], true[k], atol=1e-6)
    fb_err = sum(float((sent[k] - true[k]).norm()) for k in true)
    plain_err = sum(float((plain[k] - true[k]).norm()) for k in true)
    assert fb_err < plain_err


@pytest.mark.unit
def test_bad_modes_and_blocks_are_refused():
    with pytest.raises(ValueError, match="compression 'fp8'"):
        Codec("fp8")
    with pytest.raises(ValueError, match="must be >= 0"):
        Codec("int8", -1)


@pytest.mark.job
@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_compressed_job_counts_true_bytes_and_every_rank_holds_the_same_global(tmp_path, mode):
    rounds = 3
    cfg_path = write_config(tmp_path, "fedavg.yaml", **{**TINY, "train.rounds": rounds, "federation.compress": mode})
    proc, run_dir = run_job(cfg_path)
    assert_ok(proc)
    metrics = read_metrics(run_dir)
    received = [m for m in metrics if m["event"] == "global_received"]
    by_round = {}
    for m in received:
        assert len(set(m["digests"])) == 1, m  # both ranks of a client
        by_round.setdefault(m["round"], set()).update(m["digests"])
    assert sorted(by_round) == list(range(1, rounds + 2))
    assert all(len(d) == 1 for d in by_round.values()), by_round  # every client the same
    # the server holds what the leaders decoded: the global adapter it saves at the end
    saved = load_file(str(run_dir / "adapters" / "global" / "adapter_model.safetensors"))
    assert {digest(saved)} == by_round[rounds + 1]
    # its checkpoint after the last round keeps the compression state before the final global went
    # out (a resumed job sends it again): the reference is round `rounds`' global as decoded
    server = torch.load(run_dir / "checkpoints" / f"round-{rounds:05d}" / "server.pt", weights_only=False)
    assert {digest(server["codec"]["reference"])} == by_round[rounds]
    # true bytes on the wire: round 1's global travels whole, everything after as encoded changes
    full = Layout.of(server["global"])
    wire = Layout(Codec(mode, 256).wire_entries(full.entries))
    assert wire.nbytes < full.nbytes
    per_round = {m["round"]: m for m in metrics if m["event"] == "round"}
    n = 2  # clients
    assert per_round[1]["server_bytes_sent"] == n * (HEADER.size + full.nbytes)
    for t in range(1, rounds + 1):
        assert per_round[t]["server_bytes_received"] == n * (HEADER.size + wire.nbytes), t
    for t in range(2, rounds + 1):
        assert per_round[t]["server_bytes_sent"] == n * (HEADER.size + wire.nbytes), t
    # the adapter still learned: the final global is not the first one
    assert by_round[1] != by_round[rounds + 1]


@pytest.mark.unit
def test_compress_config_errors(tmp_path):
    from fdlora_cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="compress"):
        load_config(write_config(tmp_path, **{"federation.compress": "fp8"}))
    with pytest.raises(ConfigError, match="federation.compress_block = -1 must be >= 0"):
        load_config(write_config(tmp_path, **{"federation.compress_block": -1}))


@pytest.mark.unit
def test_a_leaders_residual_is_kept_only_when_the_server_says_its_update_counted():
    """Transport._settle: the residual of the update of round t becomes the one the next update
    carries only when the global adapter of round t + 1 says the update was averaged; else the
    residual from before it stays (the dropped update's rounding error goes with it)."""
    from fdlora_cluster.transport import Transport

    end = Transport(comm=None, plan=None, codec=Codec("int8", 64))
    before, after = change(1), change(2)
    for used, kept in ((True, after), (False, before)):
        end.residual, end.pending = before, (3, after)
        end._settle(5, used)  # another round's verdict settles nothing
        assert end.pending == (3, after) and end.residual is before
        end._settle(4, used)
        assert end.pending is None and end.residual is kept
