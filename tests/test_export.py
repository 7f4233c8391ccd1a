"""`fdlora-cluster export`: one real tiny run (module fixture), exported and reloaded with plain
PEFT / transformers, compared with the logits the trainer itself computed at the end of the run."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml

from fdlora_cluster.cli import main

from conftest import ROOT, assert_ok

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def run(finished_run):
    """The suite's shared finished run (conftest.finished_run: fdlora, 1 server + 2 clients x 2
    ranks); inspect_run.py dumped each leader's logits of a probe batch with every adapter active,
    from the trainer's own (DeepSpeed) model."""
    assert_ok(finished_run.proc)
    leaders = {0: 1, 1: 3}
    logits = {c: torch.load(finished_run.out / f"logits-rank-{r}.pt") for c, r in leaders.items()}
    assert all(logits[c]["client"] == c for c in (0, 1))
    return SimpleNamespace(dir=finished_run.dir, tmp=finished_run.tmp, cfg=finished_run.cfg, logits=logits)


@pytest.fixture(autouse=True)
def in_root(monkeypatch):
    # The run's model.pretrained is relative to where the run started (ROOT): export from there.
    monkeypatch.chdir(ROOT)


def forward(model, batch):
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


# Both clients' fused adapters: with budget 3 the search scores only its anchors; in the shared run (seed 0), client 0's fused
# acts as its global adapter and client 1's as its personal one, so exporting the wrong one fails either case.
@pytest.mark.job
@pytest.mark.parametrize("client,adapter", [(0, "personal"), (0, "global"), (0, "fused"), (1, "fused")])
def test_peft_export_reproduces_the_run(run, tmp_path, client, adapter):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(["export", str(run.dir), "--client", str(client), "--adapter", adapter, "--out", str(out)]) == 0
    dumped = run.logits[client]
    batch, ref = dumped["batch"], dumped["logits"][adapter]
    base_logits = forward(AutoModelForCausalLM.from_pretrained(out / "base"), batch)
    # The adapters must move the logits far beyond the tolerance, or the comparison proves nothing.
    assert (ref - base_logits).abs().max() > 100 * TOL["atol"]
    assert (dumped["logits"]["personal"] - dumped["logits"]["global"]).abs().max() > 100 * TOL["atol"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), str(out))
    torch.testing.assert_close(forward(model, batch), ref, **TOL)
    # base_model_name_or_path leads PEFT's auto class to the exported base
    torch.testing.assert_close(forward(AutoPeftModelForCausalLM.from_pretrained(str(out)), batch), ref, **TOL)
    # The ranks docs/SERVING.md states: fused (merge exact) is r_p + r_g, the others their own r.
    lora = json.loads((out / "adapter_config.json").read_text())
    p, g = run.cfg.lora.personal.r, run.cfg.lora.global_.r
    assert lora["r"] == {"personal": p, "global": g, "fused": p + g}[adapter]
    assert lora["base_model_name_or_path"] == str(out / "base")


@pytest.mark.job
def test_merged_export_is_a_plain_checkpoint(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", str(run.dir), "--client", "1", "--merge", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in k for k in model.state_dict())
    dumped = run.logits[1]
    batch = dumped["batch"]
    # the exported tokenizer gives the ids the run trained on: each probe row is its text + eos
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = ids[mask.bool()].tolist()
        text = bytes(ids[:-1]).decode()
        assert tok(text).input_ids + [tok.eos_token_id] == ids
    assert model.generation_config.eos_token_id == tok.eos_token_id
    torch.testing.assert_close(forward(model, batch), dumped["logits"]["fused"], **TOL)


@pytest.mark.job
def test_a_model_path_base_is_referenced_not_copied(run, tmp_path):
    """A run on a local checkpoint (model.path): the same run with its base given as the checkpoint
    the demo export writes, the tokenizer then read from that checkpoint as the trainer would."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["export", str(run.dir), "--client", "1", "--out", str(tmp_path / "first")]) == 0
    checkpoint = tmp_path / "first" / "base"

    def on_checkpoint(raw):
        raw["model"].update(path=str(checkpoint), config=None, pretrained=None)

    copy = copy_run(run, tmp_path, on_checkpoint)
    dumped = run.logits[1]
    out = tmp_path / "peft"
    assert main(["export", str(copy), "--client", "1", "--out", str(out)]) == 0
    assert not (out / "base").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(checkpoint)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), str(out))
    torch.testing.assert_close(forward(model, dumped["batch"]), dumped["logits"]["fused"], **TOL)

    merged = tmp_path / "merged"
    assert main(["export", str(copy), "--client", "1", "--merge", "--out", str(merged)]) == 0
    assert AutoTokenizer.from_pretrained(merged)("log: x").input_ids == list(b"log: x")
    torch.testing.assert_close(forward(AutoModelForCausalLM.from_pretrained(merged), dumped["batch"]),
                               dumped["logits"]["fused"], **TOL)


@pytest.mark.unit
def test_byte_tokenizer_matches_the_trainers():
    from fdlora_cluster.data.tokenizer import ByteTokenizer
    from fdlora_cluster.export import byte_tokenizer_hf

    hf, ours = byte_tokenizer_hf(), ByteTokenizer()
    assert (hf.pad_token_id, hf.eos_token_id, len(hf)) == (ours.pad_id, ours.eos_id, ours.vocab_size)
    for text in ["log: disk user retry kernel =>", " héllo\twörld ✓\n", "a literal </s> and <pad>"]:
        assert hf(text).input_ids == ours.encode(text)
        assert hf.decode(hf(text).input_ids) == text


def copy_run(run, tmp_path, edit=None):
    """A copy of the run's config and adapters, its config.yaml changed by `edit(dict)`."""
    dst = tmp_path / "copy"
    shutil.copytree(run.dir / "adapters", dst / "adapters")
    raw = yaml.safe_load((run.dir / "config.yaml").read_text())
    if edit:
        edit(raw)
    (dst / "config.yaml").write_text(yaml.safe_dump(raw))
    return dst


@pytest.mark.job
def test_export_errors_say_what_is_wrong(run, tmp_path, capsys):
    def fails(run_dir, *args, out=None):
        out = out or tmp_path / "never"
        assert main(["export", str(run_dir), *args, "--out", str(out)]) == 2
        assert not (tmp_path / "never").exists()
        return capsys.readouterr().err

    assert "no such directory" in fails(tmp_path / "nope", "--client", "0")
    # the fixture's folder holds a config.yaml but is not a run
    assert "not a run directory (it needs config.yaml and adapters/" in fails(run.tmp, "--client", "0")
    assert "--client 2: this run has 2 clients, valid: 0-1" in fails(run.dir, "--client", "2")
    broken = copy_run(run, tmp_path / "y")
    (broken / "config.yaml").write_text("model: [unclosed\n")
    assert "config.yaml: not valid YAML" in fails(broken, "--client", "0")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "exists and is not empty" in fails(run.dir, "--client", "0", out=tmp_path / "full")

    no_fused = copy_run(run, tmp_path / "a")
    shutil.rmtree(no_fused / "adapters" / "client-0" / "fused")
    err = fails(no_fused, "--client", "0")
    assert "client 0 has no fused adapter to export (not saved by strategy fdlora); what it has: personal, global" in err

    def to_fedavg(raw):
        raw["strategy"] = "fedavg"

    err = fails(copy_run(run, tmp_path / "b", to_fedavg), "--client", "0", "--adapter", "personal")
    assert "(never trained by strategy fedavg); what it has: global" in err

    def other_base(raw):
        raw["model"]["pretrained"] = str(tmp_path / "no-base")

    err = fails(copy_run(run, tmp_path / "c", other_base), "--client", "0")
    assert f"model.pretrained = {tmp_path / 'no-base'}) is missing" in err and "fdlora-cluster pretrain" in err

    def other_recipe(raw):
        raw["model"]["pretrain_steps"] += 1

    err = fails(copy_run(run, tmp_path / "d", other_recipe), "--client", "0")
    assert "is made by another recipe" in err

    def gone_checkpoint(raw):
        raw["model"].update(path=str(tmp_path / "gone"), config=None, pretrained=None)

    err = fails(copy_run(run, tmp_path / "e", gone_checkpoint), "--client", "0")
    assert f"model.path = {tmp_path / 'gone'} is not a Hugging Face checkpoint from here" in err
