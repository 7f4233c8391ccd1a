"""`fdlora-cluster report`: renders from a finished run (a real short job) and from hand-made runs."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from fdlora_cluster.cli import main
from fdlora_cluster.report import (ReportError, after_rounds, after_rounds_sentence, comparison_table, load_run,
                                   write_report)

from conftest import ROOT, assert_ok


def fake_run(path, strategy, accs, fusion=None):
    """A run directory with the files every run writes (config.yaml, summary.json, metrics.jsonl)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"strategy": strategy, "seed": 0}))
    adapters = {"fedavg": ["global"], "local": ["personal"], "fdlora": ["personal", "global", "fused"]}[strategy]
    clients = []
    for c, acc in enumerate(accs):
        s = {"client": c, "method": strategy, "ranks": 2,
             "metrics": {a: {"loss": 0.1 + c, "perplexity": 1.1, "rows": 10, "accuracy": acc} for a in adapters}}
        s["optimizer_steps"] = {"personal": 100 * ("personal" in adapters), "global": 50 * ("global" in adapters)}
        if fusion:
            s["fusion_weights"] = {"personal": fusion[c][0], "global": fusion[c][1]}
        clients.append(s)
    (path / "summary.json").write_text(json.dumps({"strategy": strategy, "rounds": 2, "world_size": 5,
                                                   "bytes_per_round": 100.0, "seconds_per_round": 0.5,
                                                   "clients": clients}))
    recs = [{"round": t, "client": c, "event": "train", "adapter": "global", "loss": 1.0 / (t + 1)}
            for t in (1, 2) for c in range(len(accs))]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return str(path)


@pytest.mark.unit
def test_report_of_several_runs_has_comparison_and_plots(tmp_path):
    a = fake_run(tmp_path / "fdlora", "fdlora", [0.9, 0.8], fusion=[(0.8, 0.4), (1.0, 0.2)])
    b = fake_run(tmp_path / "fedavg", "fedavg", [0.7, 0.6])
    c = fake_run(tmp_path / "local", "local", [0.85, 0.75])
    md = write_report([a, b, c], out_dir=str(tmp_path / "rep"))
    text = open(md).read()
    assert "| client | fdlora (fused) | fedavg (global) | local (personal) |" in text
    assert "| 0 | 0.900 | 0.700 | 0.850 |" in text and "| mean | 0.850 | 0.650 | 0.800 |" in text
    # the steps behind each adapter, a fused one's as its parts'
    assert "| fdlora | 0 | fused | 0.900 | 0.1000 | 1.100 | 10 | 0 (100 + 50) |" in text
    assert "| local | 1 | personal | 0.750 | 1.1000 | 1.100 | 10 | 100 |" in text
    assert "epsilon" not in text
    summary = json.loads(open(f"{b}/summary.json").read())
    summary["privacy"] = {"epsilon": 7.91, "delta": 1e-5, "rounds": 2, "clip_norm": 0.5, "noise_multiplier": 1.1,
                          "accountant": "rdp"}
    open(f"{b}/summary.json", "w").write(json.dumps(summary))
    private = open(write_report([b], out_dir=str(tmp_path / "rep-b"))).read()
    assert ("client-level DP on the global adapter: epsilon = 7.91 at delta = 1e-05 after 2 rounds (clip 0.5, "
            "noise multiplier 1.1, rdp accountant)") in private
    for png in ("loss_per_round.png", "accuracy_by_method.png", "fusion_weights.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
        assert f"]({png})" in text


@pytest.mark.unit
def test_report_errors_name_the_directory_and_file(tmp_path):
    with pytest.raises(ReportError, match=r"nothing: no summary\.json"):
        load_run(str(tmp_path / "nothing"))
    run = fake_run(tmp_path / "r", "fedavg", [0.5])
    with open(f"{run}/metrics.jsonl", "a") as f:
        f.write("{oops\n")
    with pytest.raises(ReportError, match=r"r/metrics\.jsonl:3: not valid JSON"):
        load_run(run)
    assert main(["report", str(tmp_path / "nothing")]) == 2
    bad = fake_run(tmp_path / "b", "fedavg", [0.5])
    summary = json.loads(open(f"{bad}/summary.json").read())
    del summary["clients"][0]["metrics"]
    open(f"{bad}/summary.json", "w").write(json.dumps(summary))
    with pytest.raises(ReportError, match=r"b/summary\.json: clients\[0\] lacks client / metrics"):
        load_run(bad)
    open(f"{run}/config.yaml", "w").write("a: [unclosed\n")
    with pytest.raises(ReportError, match=r"r/config\.yaml: not valid YAML"):
        load_run(run)


@pytest.mark.job
def test_report_renders_from_a_finished_run(finished_run, tmp_path):
    """The suite's shared finished fdlora job (1 server + 2 clients x 2 ranks; conftest.finished_run),
    then `fdlora-cluster report` on a copy of it."""
    assert_ok(finished_run.proc)
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.dir, run_dir)  # the report is written into the run directory
    assert main(["report", str(run_dir)]) == 0
    text = (run_dir / "report" / "REPORT.md").read_text()
    assert "| fdlora | 0 | fused |" in text and "| fdlora | 1 | personal |" in text
    assert (run_dir / "report" / "loss_per_round.png").is_file()
    assert (run_dir / "report" / "fusion_weights.png").is_file()
    assert "## Fusion weights" in text
    assert "comparison" not in comparison_table([load_run(str(run_dir))]).lower()
    # what follows the rounds, timed from the records: the rounds' sum, the slowest client's fusion
    # (its evaluations counted) and its adapters' evaluations (issue 18 item 4)
    run = load_run(str(run_dir))
    t = after_rounds(run)
    recs = run.metrics
    assert t["rounds"] == pytest.approx(sum(r["seconds"] for r in recs if r["event"] == "round"))
    mine = [r for r in recs if r.get("client") == t["client"]]
    assert t["fusion"] == pytest.approx(sum(r["seconds"] for r in mine if r["event"] == "fusion"))
    assert t["evaluations"] == sum(r["evaluations"] for r in mine if r["event"] == "fusion") > 0
    assert t["evaluation"] == pytest.approx(sum(r["seconds"] for r in mine if r["event"] == "eval"))
    assert t["ratio"] == pytest.approx((t["fusion"] + t["evaluation"]) / t["rounds"])
    assert after_rounds_sentence(t) in text


@pytest.mark.unit
def test_compare_seeds_table_gives_every_adapter_mean_and_spread(tmp_path):
    """bench/compare.py --seeds: the headline adapter (bold) and each other adapter a method
    evaluates, per client as mean +- sd over seeds, and the per-seed means over clients."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from compare import seeds_table

    runs = {}
    for seed, accs in ((0, [0.9, 0.7]), (1, [0.7, 0.5])):
        runs[seed] = [load_run(fake_run(tmp_path / f"s{seed}" / m, m, accs)) for m in ("fdlora", "fedavg")]
    rows = seeds_table(runs, "accuracy").splitlines()
    assert rows[0] == "| method (adapter) | client 0 | client 1 | mean over clients | seed 0 | seed 1 |"
    # fake_run gives every adapter of a run the same accuracy: client 0 0.9 / 0.7 over the seeds
    assert rows[2] == "| **fdlora (fused)** | 0.800 +- 0.141 | 0.600 +- 0.141 | 0.700 +- 0.141 | 0.800 | 0.600 |"
    assert [r.split(" | ")[0] for r in rows[3:]] == ["| fdlora (personal)", "| fdlora (global)", "| **fedavg (global)**"]


@pytest.mark.unit
def test_compare_setting_goes_over_each_strategy_config(tmp_path):
    """bench/compare.py --setting configs/real-smollm2.yaml: the setting's own sections (the real
    model, 2 x 1 ranks, its train sizes) replace the demo's in every strategy's config, and each
    strategy keeps its own sections (fedavg its plain-average outer step, fdlora its fusion)."""
    import sys

    from fdlora_cluster.config import ConfigError, load_config

    sys.path.insert(0, str(ROOT / "bench"))
    from compare import with_setting

    strategies = ("fdlora", "local", "fedavg")
    paths = with_setting([str(ROOT / "configs" / f"{s}.yaml") for s in strategies],
                         str(ROOT / "configs" / "real-smollm2.yaml"), str(tmp_path / "configs"))
    model_dir = tmp_path / "smollm2"  # model.path must be a directory; nothing is loaded here
    model_dir.mkdir()
    cfgs = {s: load_config(p, [f"model.path={model_dir}"]) for s, p in zip(strategies, paths)}
    for s, cfg in cfgs.items():
        assert cfg.strategy == s and cfg.model.config is None and cfg.model.pretrained is None
        assert cfg.client_sizes() == [1, 1] and cfg.train.lr == 0.001 and cfg.train.max_seq_len == 32
        assert list(cfg.lora.personal.target_modules) == ["q_proj", "v_proj"]
    assert (cfgs["fedavg"].outer.optimizer, cfgs["fedavg"].outer.lr) == ("sgd", 1.0)
    assert cfgs["fdlora"].outer.optimizer == "nesterov" and cfgs["fdlora"].fusion.budget == 20
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategy: local\n")
    with pytest.raises(ConfigError, match="must not set `strategy`"):
        with_setting(paths[:1], str(bad), str(tmp_path / "other"))
