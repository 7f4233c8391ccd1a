"""Mixed precision through DeepSpeed's own config: one source for the base's dtype, the adapters in
fp32 wherever they leave the engine (sent, fused, saved), and a real bf16 job on CPU."""

import pytest
import torch
from safetensors.torch import load_file

from fdlora_cluster.config import ConfigError, config_from_dict

from conftest import TINY, assert_ok, read_metrics, run_job, write_config
from test_config import demo_raw


def cfg_with(ds: dict | None = None, dtype: str | None = None):
    raw = demo_raw()
    raw["deepspeed"] = {**raw["deepspeed"], **(ds or {})}
    if dtype:
        raw["model"]["dtype"] = dtype
    return config_from_dict(raw)


@pytest.mark.unit
def test_deepspeed_section_decides_the_base_dtype():
    assert cfg_with().base_dtype(0) == "float32"
    assert cfg_with({"bf16": {"enabled": True}}).base_dtype(1) == "bfloat16"
    assert cfg_with({"fp16": {"enabled": True}}).base_dtype(0) == "float16"
    assert cfg_with({"bfloat16": {"enabled": True}}).base_dtype(0) == "bfloat16"  # DeepSpeed's alias


@pytest.mark.unit
def test_model_dtype_switches_on_deepspeed_section():
    from fdlora_cluster.config import deepspeed_dict

    cfg = cfg_with(dtype="bfloat16")
    assert deepspeed_dict(cfg, 0)["bf16"] == {"enabled": True} and cfg.base_dtype(0) == "bfloat16"


@pytest.mark.unit
@pytest.mark.parametrize("ds, dtype, says", [
    ({"bf16": {"enabled": True}}, "float32", r"bf16.enabled is true but model.dtype = float32"),
    ({"fp16": {"enabled": True}}, "bfloat16", r"model.dtype = bfloat16 but DeepSpeed's fp16 section is enabled"),
    ({"bf16": {"enabled": False}}, "bfloat16", r"bf16.enabled is false"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, None, r"bf16 and fp16 are both enabled"),
    ({"bf16": True}, None, r"bf16 must be a mapping"),
])
def test_precision_disagreements_are_refused(ds, dtype, says):
    with pytest.raises(ConfigError, match=says):
        cfg_with(ds, dtype)


@pytest.mark.job
@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_job_on_cpu_keeps_adapters_fp32(tmp_path, stage):
    """DeepSpeed bf16 on CPU (gloo), ZeRO-2 and 3: the base runs in bf16; the adapters that travel,
    fuse and save are DeepSpeed's fp32 masters, not bf16-rounded copies."""
    config = write_config(tmp_path, **{**TINY, "topology.clients": [2, 1], "train.rounds": 1,
                                       "deepspeed.bf16": {"enabled": True},
                                       "deepspeed.zero_optimization.stage": stage})
    proc, run = run_job(config)
    assert_ok(proc)
    for path in (run / "adapters" / "global", run / "adapters" / "client-0" / "personal",
                 run / "adapters" / "client-1" / "fused"):
        state = load_file(str(path / "adapter_model.safetensors"))
        assert all(t.dtype == torch.float32 for t in state.values()), path
    # fp32 masters, not bf16 copies: a trained B matrix has values that bf16 cannot represent
    b = next(t for k, t in load_file(str(run / "adapters" / "client-0" / "personal" / "adapter_model.safetensors")).items()
             if k.endswith("lora_B.weight"))
    assert not torch.equal(b, b.to(torch.bfloat16).to(torch.float32))
    # every rank of the client received bit-identical global weights
    for m in read_metrics(run):
        if m["event"] == "global_received":
            assert len(set(m["digests"])) == 1
