"""Experiment tracking (tracking.py): a real job with log.tensorboard: true writes TensorBoard event
files whose scalars are the numbers of metrics.jsonl and summary.json; trackers that are asked for
but not installed are config errors that name the package."""

import importlib.util
import struct
from pathlib import Path

import pytest

from fdlora_cluster.config import ConfigError, check_environment, load_config

from conftest import CONFIGS, TINY, assert_ok, read_metrics, read_summary


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the event files: TFRecord framing (length, its crc, the record, its
    crc) around Event protos, read with the protobuf classes tensorboardX ships."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


@pytest.mark.job
def test_tensorboard_scalars_are_the_runs_metrics(finished_run):
    """The suite's shared finished run (conftest.finished_run), which has log.tensorboard on."""
    rounds = TINY["train.rounds"]
    assert finished_run.cfg.log.tensorboard
    assert_ok(finished_run.proc)
    run = finished_run.dir
    got = read_scalars(run / "tensorboard")
    metrics, summary = read_metrics(run), read_summary(run)
    approx = lambda x: pytest.approx(x, rel=1e-6, abs=1e-9)  # float32 in the event file

    round_recs = [m for m in metrics if m["event"] == "round"]
    assert [m["round"] for m in round_recs] == list(range(1, rounds + 1))
    for m in round_recs:
        t = m["round"]
        assert got["round/seconds"][t] == approx(m["seconds"])
        assert got["round/bytes_sent"][t] == m["server_bytes_sent"] and got["round/bytes_received"][t] == m["server_bytes_received"]
        assert got["round/global_change"][t] == approx(m["global_change"])
        assert got["round/updates"][t] == len(m["clients"])
    for c in (0, 1):
        train = {(m["adapter"], m["round"]): m["loss"] for m in metrics if m["event"] == "train" and m["client"] == c}
        assert ("personal", 0) in train and all(("global", t) in train for t in range(1, rounds + 1)), train
        for (adapter, t), loss in train.items():
            assert got[f"client{c}/train_loss/{adapter}"][t] == approx(loss), (c, adapter, t)
        evals = [m for m in metrics if m["event"] == "eval" and m["client"] == c]
        assert {m["adapter"] for m in evals} == {"personal", "global", "fused"}
        for m in evals:
            for k in ("loss", "accuracy", "accuracy_all", "perplexity"):
                assert got[f"client{c}/eval/{m['adapter']}/{k}"] == {rounds: approx(m[k])}, (c, m["adapter"], k)
        (fusion,) = [m for m in metrics if m["event"] == "fusion" and m["client"] == c]
        assert got[f"client{c}/fusion/w_personal"] == {rounds: approx(fusion["w_personal"])}
        assert got[f"client{c}/fusion/w_global"] == {rounds: approx(fusion["w_global"])}
        (s,) = [s for s in summary["clients"] if s["client"] == c]
        assert s["bytes_total"] > 0 and got[f"client{c}/bytes_total"] == {rounds: approx(s["bytes_total"])}


@pytest.mark.unit
def test_trackers_are_off_by_default():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert not (cfg.log.tensorboard or cfg.log.wandb or cfg.log.mlflow)


@pytest.mark.unit
@pytest.mark.parametrize("key, package", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_tracker_asked_for_but_not_installed_is_a_config_error(key, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(ConfigError, match=rf"log.{key} = true needs the `{package}` package, which is not "
                                          rf"installed: pip install {package}"):
        check_environment(load_config(CONFIGS / "demo.yaml", [f"log.{key}=true"]))


@pytest.mark.unit
def test_tensorboard_without_tensorboardx_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log.tensorboard = true needs the `tensorboardX` package"):
        check_environment(load_config(CONFIGS / "demo.yaml", ["log.tensorboard=true"]))


@pytest.mark.unit
@pytest.mark.parametrize("override, says", [
    ("log.progress=fancy", r"log.progress = 'fancy' is not valid; expected one of 'auto', 'bar', 'lines'"),
    ("log.tensorboard=3", r"log.tensorboard"),
    ("log.project=''", r"log.project must not be empty"),
])
def test_bad_log_values_are_config_errors(override, says):
    with pytest.raises(ConfigError, match=says):
        load_config(CONFIGS / "demo.yaml", [override])
