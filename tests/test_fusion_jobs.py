"""Fusion in real jobs (issue 10): every candidate is scored as the adapter that is saved, and the
choice is never worse than personal only, global only or both at 1 on the search rows."""

import pytest
import torch

from fdlora_cluster.config import load_config

from conftest import TINY, assert_ok, read_metrics, read_summary, run_job, write_config

pytestmark = pytest.mark.job


def fewshot_loss_of_saved(cfg, client: int, path) -> float:
    """Mean token loss of the saved PEFT adapter on the client's search rows, with plain PEFT."""
    from peft import PeftModel

    from fdlora_cluster.data import collate, get_tokenizer, load_clients
    from fdlora_cluster.model import build_base

    tok = get_tokenizer(cfg.model.path)
    data = load_clients(cfg.data, len(cfg.client_sizes()), cfg.seed)[client]
    rows = data.fewshot if cfg.fusion.rows == "heldout" else data.train[: cfg.data.fewshot_rows]
    model = PeftModel.from_pretrained(build_base(cfg.model, cfg.seed, tok.vocab_size), str(path)).eval()
    b = collate(tok, rows, cfg.train.max_seq_len)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    labels = b["labels"][:, 1:]
    mask = labels != -100
    nll = -torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float((nll * mask).sum() / mask.sum())


def fewshot_candidate_ce_of_saved(cfg, client: int, path) -> float:
    """The candidate objective of the saved PEFT adapter on the client's search rows, recomputed
    with plain PEFT: per row, -log of the own response's share of the candidates' likelihoods
    (rows whose response is no candidate: their mean token loss), averaged over rows."""
    import numpy as np
    from peft import PeftModel

    from fdlora_cluster.data import Example, collate, get_tokenizer, load_clients
    from fdlora_cluster.model import build_base

    tok = get_tokenizer(cfg.model.path)
    data = load_clients(cfg.data, len(cfg.client_sizes()), cfg.seed)[client]
    rows = data.fewshot if cfg.fusion.rows == "heldout" else data.train[: cfg.data.fewshot_rows]
    cands = data.candidates_all if cfg.eval.headline == "accuracy_all" else data.candidates
    model = PeftModel.from_pretrained(build_base(cfg.model, cfg.seed, tok.vocab_size), str(path)).eval()

    def nll(examples):
        b = collate(tok, examples, cfg.train.max_seq_len)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        mask = labels != -100
        tok_nll = -torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        return tok_nll.sum(-1).double().numpy(), mask.sum(-1).double().numpy()

    per_row = []
    for ex in rows:
        if ex.response in cands:
            cn, _ = nll([Example(ex.prompt, c) for c in cands])
            z = -cn
            per_row.append(float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[cands.index(ex.response)]))
        else:
            n, t = nll([ex])
            per_row.append(float(n[0] / t[0]))
    return float(np.mean(per_row))


def accuracies_of_saved(cfg, client: int, path) -> tuple[float, float]:
    """(accuracy over the client's own labels, accuracy over every client's) of a saved adapter on
    the client's test rows, recomputed with plain PEFT."""
    from peft import PeftModel

    from fdlora_cluster.data import Example, collate, get_tokenizer, load_clients
    from fdlora_cluster.model import build_base

    tok = get_tokenizer(cfg.model.path)
    data = load_clients(cfg.data, len(cfg.client_sizes()), cfg.seed)[client]
    model = PeftModel.from_pretrained(build_base(cfg.model, cfg.seed, tok.vocab_size), str(path)).eval()
    out = []
    for cands in (data.candidates, data.candidates_all):
        b = collate(tok, [Example(ex.prompt, c) for ex in data.test for c in cands], cfg.train.max_seq_len)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        best = (lp * (labels != -100)).sum(-1).view(len(data.test), len(cands)).argmax(-1)
        out.append(sum(cands[int(i)] == ex.response for i, ex in zip(best, data.test)) / len(data.test))
    return out[0], out[1]


def label_files(tmp_path) -> list[str]:
    """Two clients that name the same two labels differently (" yes"/" no" and " good"/" bad")."""
    import json

    files = []
    for c, (pos, neg) in enumerate(((" yes", " no"), (" good", " bad"))):
        path = tmp_path / f"client{c}.jsonl"
        with open(path, "w") as f:
            for i in range(60):
                hot = i % 3 == 0
                f.write(json.dumps({"prompt": f"log: item {i} {'panic' if hot else 'ok'} =>",
                                    "response": pos if hot else neg, "label": "hot" if hot else "cold"}) + "\n")
        files.append(str(path))
    return files


@pytest.mark.parametrize("merge,granularity,objective,folds,own_labels", [
    ("exact", "layer", "candidates", 1, False),
    ("params", "adapter", "mix", 2, True),
])
def test_recorded_choice_is_the_saved_adapter_and_never_worse_than_its_anchors(tmp_path, merge, granularity,
                                                                               objective, folds, own_labels):
    data = {"data.source": "jsonl", "data.files": label_files(tmp_path)} if own_labels else {}
    cfg_path = write_config(tmp_path, "fdlora.yaml", **{
        **TINY, "topology.clients": [1, 1], "fusion.budget": 6, "fusion.merge": merge,
        "fusion.granularity": granularity, "fusion.objective": objective, "fusion.folds": folds, **data})
    proc, run_dir = run_job(cfg_path)
    assert_ok(proc)
    cfg = load_config(cfg_path)
    metrics = read_metrics(run_dir)
    summary = read_summary(run_dir)
    for c in range(2):
        chosen = next(m for m in metrics if m["event"] == "fusion" and m["client"] == c)
        steps = [m for m in metrics if m["event"] == "fusion_step" and m["client"] == c]
        anchors = [m for m in steps if m["phase"] == "anchor"]
        assert [tuple(m["weights"][0]) for m in anchors] == [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
        assert all(chosen["objective"] <= a["objective"] for a in anchors), (chosen, anchors)
        assert chosen["granularity"] == granularity and len(chosen["weights"]) == (2 if granularity == "layer" else 1)
        assert (chosen["cv"] is not None) == (folds > 1)
        # the loss the search recorded for its choice is the saved fused adapter's, reloaded with PEFT
        fused = run_dir / "adapters" / f"client-{c}" / "fused"
        saved = fewshot_loss_of_saved(cfg, c, fused)
        assert saved == pytest.approx(chosen["loss"], rel=1e-4, abs=1e-6)
        if objective == "candidates":
            # done-when of issue 18 item 3: the fusion's objective (without its pull to the anchor)
            # is the candidate cross-entropy of the saved fused adapter
            assert fewshot_candidate_ce_of_saved(cfg, c, fused) == pytest.approx(chosen["data_objective"],
                                                                                rel=1e-4, abs=1e-6)
        left = any(tuple(w) not in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)) for w in chosen["weights"].values())
        choice = next(s for s in summary["clients"] if s["client"] == c)["fusion"]
        assert choice["left_anchors"] == chosen["left_anchors"] == left
        assert choice["chosen_by"] == chosen["chosen_by"] and choice["search_objective"] == objective
        # issue 18 item 1: the steps each adapter took (stage 1 on personal, rounds x K on global)
        assert next(s for s in summary["clients"] if s["client"] == c)["optimizer_steps"] == {
            "personal": cfg.train.personal_steps, "global": cfg.train.rounds * cfg.train.inner_steps}
        fw = next(s for s in summary["clients"] if s["client"] == c)["fusion_weights"]
        assert fw["personal"] == pytest.approx(chosen["w_personal"])
        metrics_c = next(s for s in summary["clients"] if s["client"] == c)["metrics"]
        for m in metrics_c.values():
            # a row right among all labels is right among the client's own (a subset holding its answer)
            assert 0.0 <= m["accuracy_all"] <= m["accuracy"] <= 1.0
        if own_labels:
            # both accuracies are what plain PEFT finds on the saved adapters, each over its label set
            for name, path in (("global", run_dir / "adapters" / "global"),
                               ("fused", run_dir / "adapters" / f"client-{c}" / "fused")):
                own, union = accuracies_of_saved(cfg, c, path)
                assert (metrics_c[name]["accuracy"], metrics_c[name]["accuracy_all"]) == pytest.approx((own, union))


def test_fold_back_trains_personal_on_train_and_fewshot_rows_and_the_saved_fused_is_the_chosen_merge(tmp_path):
    """fusion.fold_back_steps (issue 18 item 3): after the search, the personal adapter takes 3 more
    steps on its training and few-shot rows, counted in its optimizer steps, and the saved fused
    adapter is the search's weights applied to the saved personal and global adapters."""
    from safetensors.torch import load_file

    from fdlora_cluster.fusion import fuse

    cfg_path = write_config(tmp_path, "fdlora.yaml", **{
        **TINY, "topology.clients": [1, 1], "fusion.budget": 6, "fusion.folds": 1, "fusion.fold_back_steps": 3})
    proc, run_dir = run_job(cfg_path)
    assert_ok(proc)
    cfg = load_config(cfg_path)
    metrics, summary = read_metrics(run_dir), read_summary(run_dir)
    adapters = run_dir / "adapters"
    glob = load_file(str(adapters / "global" / "adapter_model.safetensors"))
    s_p, s_g = cfg.lora.personal.alpha / cfg.lora.personal.r, cfg.lora.global_.alpha / cfg.lora.global_.r
    for c in range(2):
        mine = sorted((m for m in metrics if m.get("client") == c and m["event"] in ("fusion", "train", "fused_again")),
                      key=lambda m: m["time"])  # metrics.jsonl is in round order, and the fusion's records have none
        kinds = [(m["event"], m.get("adapter"), m.get("fewshot", False)) for m in mine]
        # the fold-back's training comes after the search and before the fused adapter is merged again
        assert kinds[-3:] == [("fusion", None, False), ("train", "personal", True), ("fused_again", None, False)], kinds
        assert mine[-2]["steps"] == 3 and mine[-2]["loss"] > 0
        steps = next(s for s in summary["clients"] if s["client"] == c)["optimizer_steps"]
        assert steps == {"personal": cfg.train.personal_steps + 3, "global": cfg.train.rounds * cfg.train.inner_steps}
        (w_p, w_g), = mine[-3]["weights"].values()
        personal = load_file(str(adapters / f"client-{c}" / "personal" / "adapter_model.safetensors"))
        saved = load_file(str(adapters / f"client-{c}" / "fused" / "adapter_model.safetensors"))
        want = fuse(personal, glob, w_p, w_g, s_p, s_g, "exact")
        assert saved.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(saved[k], want[k], rtol=1e-6, atol=1e-7)
