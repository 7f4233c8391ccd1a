"""Config loading: every error names the key and what is allowed."""

import json

import pytest
import yaml

from fdlora_cluster.config import ConfigError, check_environment, config_from_dict, deepspeed_dict, load_config
from fdlora_cluster.topology import RankPlan, TopologyError

from conftest import CONFIGS, write_config

pytestmark = pytest.mark.unit


def demo_raw():
    from fdlora_cluster.config import read_yaml

    return read_yaml(str(CONFIGS / "demo.yaml"))


def test_demo_config_loads():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.client_sizes() == [2, 2]
    assert cfg.world_size() == 5
    assert cfg.lora.global_.r == cfg.lora.personal.r


def test_unknown_top_level_key_names_it_and_the_allowed_keys():
    raw = demo_raw()
    raw["trian"] = {}
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; allowed keys at top level: .*train"):
        config_from_dict(raw)


def test_unknown_nested_key_names_its_path():
    raw = demo_raw()
    raw["train"]["inner_stpes"] = 3
    with pytest.raises(ConfigError, match=r"unknown key 'train\.inner_stpes'; allowed keys at train: .*inner_steps"):
        config_from_dict(raw)


def test_wrong_type_names_key_and_expected_type():
    raw = demo_raw()
    raw["train"]["rounds"] = "three"
    with pytest.raises(ConfigError, match=r"train\.rounds = 'three' is not valid; expected int"):
        config_from_dict(raw)


def test_bad_choice_lists_allowed_values():
    raw = demo_raw()
    raw["outer"]["optimizer"] = "lamb"
    with pytest.raises(ConfigError, match=r"outer\.optimizer = 'lamb'.*'sgd', 'nesterov', 'adam'"):
        config_from_dict(raw)


def test_every_error_of_a_file_is_reported_at_once(tmp_path):
    raw = demo_raw()
    raw["train"]["rounds"] = "three"
    raw["log"] = {"levle": "INFO"}
    raw["fusion"] = {"mix": 2}
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 3 errors:"), msg
    assert "train.rounds = 'three' is not valid; expected int" in msg
    assert "unknown key 'log.levle'; allowed keys at log: " in msg
    assert "fusion.mix = 2.0 must be in [0, 1]" in msg


def test_unknown_strategy_lists_strategies():
    raw = demo_raw()
    raw["strategy"] = "fedsomething"
    with pytest.raises(ConfigError, match=r"strategy = 'fedsomething' is not valid; expected one of fdlora, fedavg"):
        config_from_dict(raw)


def test_topology_needs_a_layout():
    raw = demo_raw()
    raw["topology"] = {"num_clients": 2}
    with pytest.raises(ConfigError, match="num_clients and ranks_per_client"):
        config_from_dict(raw)
    raw["topology"] = {"clients": [2, 0]}
    with pytest.raises(ConfigError, match=r"every client needs at least 1 rank"):
        config_from_dict(raw)


def test_topology_against_world_size_says_how_many_ranks():
    plan = RankPlan((2, 2))
    with pytest.raises(TopologyError, match=r"1 server \+ \(2 \+ 2\) client ranks = 5 ranks, but the job has WORLD_SIZE\(3\)"):
        plan.check_world(3)


def test_model_needs_exactly_one_source(tmp_path):
    raw = demo_raw()
    raw["model"]["path"] = str(tmp_path)
    with pytest.raises(ConfigError, match="exactly one of model.path"):
        config_from_dict(raw)
    raw = demo_raw()
    raw["model"] = {"path": str(tmp_path / "missing")}
    with pytest.raises(ConfigError, match="model.path = .*missing' is not a directory"):
        config_from_dict(raw)


def test_client_override_for_missing_client():
    raw = demo_raw()
    raw["client_overrides"] = {5: {"inner_steps": 2}}
    with pytest.raises(ConfigError, match=r"client_overrides has client 5, but the topology has 2 clients"):
        config_from_dict(raw)


def test_params_merge_needs_equal_ranks():
    raw = demo_raw()
    raw["lora"]["global"]["r"] = 8
    raw["fusion"] = {"merge": "params"}
    with pytest.raises(ConfigError, match="merge = 'params'.*same r"):
        config_from_dict(raw)


def test_jsonl_files_must_exist_and_match_clients(tmp_path):
    raw = demo_raw()
    raw["data"] = {"source": "jsonl", "files": [str(tmp_path / "nope.jsonl")]}
    with pytest.raises(ConfigError, match="nope.jsonl not found"):
        config_from_dict(raw)
    f = tmp_path / "a.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n')
    raw["data"] = {"source": "jsonl", "files": [str(f)] * 3}
    with pytest.raises(ConfigError, match="data.files has 3 files; give 1 .* or 2"):
        config_from_dict(raw)


def test_set_overrides_and_bad_override(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", ["train.rounds=7", "topology.clients=[1, 3]", "lora.global.r=2"])
    assert cfg.train.rounds == 7 and cfg.client_sizes() == [1, 3] and cfg.lora.global_.r == 2
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(CONFIGS / "demo.yaml", ["train.rounds"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.round'"):
        load_config(CONFIGS / "demo.yaml", ["train.round=2"])


def test_missing_file_and_duplicate_keys(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nothere.yaml"):
        load_config(tmp_path / "nothere.yaml")
    p = tmp_path / "dup.yaml"
    p.write_text("strategy: fedavg\nseed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:3: key 'seed' is given twice"):
        load_config(p)


def test_an_exponent_without_a_dot_is_a_number_in_a_file_and_in_set(tmp_path):
    # YAML 1.1 (PyYAML) reads `1e-4` as a string; the trainer's loader reads it as YAML 1.2 does
    p = tmp_path / "lr.yaml"
    p.write_text(f"include: {CONFIGS / 'demo.yaml'}\ntrain: {{lr: 1e-4}}\nglobal: {{aggregation: uniform}}\nprivacy: {{clip_norm: 1, noise_multiplier: 1, delta: 1e-5}}\n")
    cfg = load_config(p)
    assert cfg.train.lr == 1e-4 and cfg.privacy.delta == 1e-5
    assert load_config(CONFIGS / "demo.yaml", ["train.lr=2E-3"]).train.lr == 2e-3
    assert load_config(CONFIGS / "demo.yaml", ["output_dir=runs/1e5"]).output_dir == "runs/1e5"  # a path stays one
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(CONFIGS / "demo.yaml", ["train.lr=1e-"])


def test_include_merges_sections(tmp_path):
    p = tmp_path / "child.yaml"
    p.write_text(f"include: {CONFIGS / 'demo.yaml'}\ntrain: {{rounds: 9}}\n")
    cfg = load_config(p)
    assert cfg.train.rounds == 9
    assert cfg.train.inner_steps == load_config(CONFIGS / "demo.yaml").train.inner_steps


def test_deepspeed_passthrough_file_and_per_client_override(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}))
    path = write_config(tmp_path, deepspeed=str(ds),
                        client_overrides={1: {"deepspeed": {"zero_optimization": {"stage": 1}}, "micro_batch_size": 2}})
    cfg = load_config(path)
    d0, d1 = deepspeed_dict(cfg, 0), deepspeed_dict(cfg, 1)
    assert d0["zero_optimization"]["stage"] == 3 and d0["gradient_clipping"] == 1.0
    assert d1["zero_optimization"]["stage"] == 1 and d1["gradient_clipping"] == 1.0
    assert d1["train_micro_batch_size_per_gpu"] == 2 and d0["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        load_config(write_config(tmp_path, deepspeed=str(bad)))


def test_bad_zero_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"stage = 4 \(client 0\); expected 0, 1, 2 or 3"):
        load_config(write_config(tmp_path, deepspeed={"zero_optimization": {"stage": 4}}))


def test_fedprox_refuses_zero3_naming_the_client(tmp_path):
    path = write_config(tmp_path, "fedprox.yaml",
                        client_overrides={1: {"deepspeed": {"zero_optimization": {"stage": 3}}}})
    with pytest.raises(ConfigError, match=r"strategy fedprox .* client 1 has zero_optimization.stage = 3"):
        load_config(path)


def test_adapter_copies_need_equal_layouts():
    raw = demo_raw()
    raw["lora"]["global"]["r"] = 8
    raw["global"] = {"init": "personal_mean"}
    with pytest.raises(ConfigError, match=r"need the same r, alpha and target_modules \(now r 4 vs 8"):
        config_from_dict(raw)
    raw = demo_raw()
    raw["strategy"] = "fdlora"
    raw["lora"]["global"]["target_modules"] = ["q_proj"]
    with pytest.raises(ConfigError, match=r"strategy fdlora fuses .* must equal lora.global.target_modules"):
        config_from_dict(raw)


def test_fusion_optimizer_must_exist_in_nevergrad():
    cfg = load_config(CONFIGS / "fdlora.yaml", ["fusion.optimizer=NoSuchOpt"])  # loading imports no nevergrad
    with pytest.raises(ConfigError, match=r"fusion.optimizer = 'NoSuchOpt' is not a nevergrad optimizer"):
        check_environment(cfg)


def test_model_type_must_be_one_transformers_knows():
    cfg = load_config(CONFIGS / "demo.yaml", ["model.config.model_type=lama"])  # loading imports no transformers
    with pytest.raises(ConfigError, match=r"model.config.model_type = 'lama' is not a causal LM type"):
        check_environment(cfg)
    check_environment(cfg, roles=("server",))  # the server builds no model


def test_environment_errors_are_said_together_worded_as_loading():
    cfg = load_config(CONFIGS / "fdlora.yaml", ["fusion.optimizer=NoSuchOpt", "model.config.model_type=lama"])
    with pytest.raises(ConfigError) as e:
        check_environment(cfg, "x.yaml")
    assert str(e.value).startswith("x.yaml: 2 errors:\n  - model.config.model_type = 'lama'"), str(e.value)


def test_loading_a_config_imports_no_heavy_package():
    """Loading is for every rank and `report`: the server must not import transformers at start
    (check_environment holds what needs them)."""
    import subprocess
    import sys

    code = ("import sys, fdlora_cluster.config as c; c.load_config(sys.argv[1]); "
            "print(sorted(m for m in ('transformers', 'peft', 'nevergrad', 'deepspeed', 'tensorboardX', 'wandb', "
            "'mlflow', 'datasets', 'mpi4py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(CONFIGS / "demo.yaml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("override, message", [
    ("seed=-1", r"seed = -1 must be >= 0"),
    ("lora.global.alpha=0", r"lora.global.alpha = 0.0 must be > 0"),
    ("outer.lr=-1", r"outer.lr = -1.0 must be > 0"),
    ("outer.momentum=5", r"outer.momentum = 5.0 must be in \[0, 1\)"),
    ("fedprox_mu=-5", r"fedprox_mu = -5.0 must be >= 0"),
    ("fusion.l1=-1", r"fusion.l1 = -1.0 must be >= 0"),
    ("personal.steps_per_round=-2", r"personal.steps_per_round = -2 must be >= 0"),
    ("data.max_rows_per_client=-5", r"data.max_rows_per_client = -5 must be >= 1"),
    ("data.fewshot_rows=0", r"strategy fdlora searches its fusion weights .* data.fewshot_rows = 0"),
    ("deepspeed.zero_optimization=2", r"zero_optimization must be a mapping, got 2"),
    ("deepspeed.scheduler={type: WarmupLR}", r"an LR scheduler is not supported"),
    ("deepspeed.train_micro_batch_size_per_gpu=0", r"train_micro_batch_size_per_gpu = 0 must be an integer >= 1"),
    ("deepspeed.optimizer={type: AdamW, params: {lr: -1}}", r"optimizer.params.lr = -1 must be a number > 0"),
])
def test_out_of_range_values_fail_on_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "demo.yaml", [override])


def test_params_merge_needs_equal_alphas():
    with pytest.raises(ConfigError, match=r"need the same r, alpha and target_modules"):
        load_config(CONFIGS / "demo.yaml", ["fusion.merge=params", "lora.global.alpha=32"])


def test_deepspeed_keys_the_user_sets_are_what_the_trainer_uses(tmp_path):
    """The engine reads lr and micro batch from this dict, so a DeepSpeed value must win over
    `train` (and a client's micro_batch_size over both), and `check` prints the same."""
    cfg = load_config(CONFIGS / "demo.yaml", [
        "deepspeed.optimizer={type: AdamW, params: {lr: 0.0001, torch_adam: true}}",
        "deepspeed.train_micro_batch_size_per_gpu=2", "client_overrides={1: {micro_batch_size: 3}}"])
    d0, d1 = deepspeed_dict(cfg, 0), deepspeed_dict(cfg, 1)
    assert d0["optimizer"]["params"]["lr"] == 0.0001 and d0["train_micro_batch_size_per_gpu"] == 2
    assert d1["train_micro_batch_size_per_gpu"] == 3
    plain = deepspeed_dict(load_config(CONFIGS / "demo.yaml"), 0)
    assert plain["optimizer"]["params"]["lr"] == cfg.train.lr
    assert plain["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
    with pytest.raises(ConfigError, match=r"client_overrides.1: micro_batch_size = 3 but its deepspeed"):
        load_config(CONFIGS / "demo.yaml", [
            "client_overrides={1: {micro_batch_size: 3, deepspeed: {train_micro_batch_size_per_gpu: 4}}}"])


def test_output_is_a_path_never_yaml(tmp_path, capsys):
    from fdlora_cluster.cli import main

    assert main(["check", str(CONFIGS / "demo.yaml"), "--output", "2024"]) == 0
    assert "output 2024" in capsys.readouterr().out


def test_check_world_size_prints_the_number_alone(capsys):
    """`check --world-size` is how the launch scripts size a job (launch/common.sh): the number
    alone on stdout, after the same --set arguments the run gets; a config error goes to stderr
    with exit 2 and nothing on stdout, so no script starts with an empty -n."""
    from fdlora_cluster.cli import main

    demo = str(CONFIGS / "demo.yaml")
    assert main(["check", demo, "--world-size"]) == 0
    assert capsys.readouterr().out == "5\n"
    assert main(["check", demo, "--set", "topology.clients=[1,3,2]", "--world-size"]) == 0
    assert capsys.readouterr().out == "7\n"
    assert main(["check", demo, "--resume", "auto", "--world-size"]) == 0  # run's arguments pass
    assert capsys.readouterr().out == "5\n"
    assert main(["check", demo, "--set", "topology.clients=[2,0]", "--world-size"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("config error:") and "topology.clients" in err, (out, err)


def test_check_reads_every_clients_data_as_the_ranks_will(tmp_path, capsys):
    """`check` reads the data (data.load_clients) and checks the responses against max_seq_len, so
    a data error is found before any rank starts; it prints each client's rows."""
    from fdlora_cluster.cli import main

    assert main(["check", str(CONFIGS / "demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "rows (train/few-shot/test)" in out and out.count("74/16/60") == 2, out
    assert main(["check", str(CONFIGS / "demo.yaml"), "--set", "train.max_seq_len=6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("data error: client 0: a ") and "does not fit train.max_seq_len = 6" in err, err


@pytest.mark.parametrize("strategy, want", [
    ("fdlora", ("nesterov", 0.7, 0.9)), ("diloco", ("nesterov", 0.7, 0.9)),
    ("fedavg", ("sgd", 1.0, 0.9)), ("fedprox", ("sgd", 1.0, 0.9)),
])
def test_outer_step_defaults_to_the_strategys_own(tmp_path, strategy, want):
    """A config written from scratch, with no `outer:` section, gets its method's outer step;
    the resolved config (what config.yaml records) says which."""
    raw = demo_raw()
    raw.pop("outer")
    raw["strategy"] = strategy
    o = config_from_dict(raw).outer
    assert (o.optimizer, o.lr, o.momentum) == want
    assert config_from_dict(raw).to_dict()["outer"]["optimizer"] == want[0]


def test_an_explicit_outer_section_wins_key_by_key():
    raw = demo_raw()
    raw["outer"] = {"optimizer": "sgd"}
    o = config_from_dict({**raw, "strategy": "fdlora"}).outer
    assert (o.optimizer, o.lr) == ("sgd", 1.0)  # the optimizer given, its own lr
    raw["outer"] = {"lr": 0.3}
    o = config_from_dict({**raw, "strategy": "fdlora"}).outer
    assert (o.optimizer, o.lr, o.momentum) == ("nesterov", 0.3, 0.9)
    # a resolved config loads back to the same thing
    cfg = config_from_dict({**raw, "strategy": "fedavg"})
    assert config_from_dict(cfg.to_dict()).outer == cfg.outer


@pytest.mark.parametrize("override, message", [
    ("fusion.objective=f1", r"fusion.objective = 'f1' is not valid; expected one of 'candidates', 'loss', 'accuracy', 'mix'"),
    ("fusion.granularity=row", r"fusion.granularity = 'row' is not valid; expected one of 'adapter', 'layer', 'module'"),
    ("fusion.mix=1.5", r"fusion.mix = 1.5 must be in \[0, 1\]"),
    ("fusion.folds=0", r"fusion.folds = 0 must be >= 1"),
    ("fusion.folds=40", r"fusion.folds = 40 needs at least one search row per fold, but data.fewshot_rows = 16"),
    ("fusion.budget=2", r"fusion.budget = 2 must be >= 3"),
    ("eval.headline=f1", r"eval.headline = 'f1' is not valid; expected one of 'accuracy', 'accuracy_all'"),
])
def test_fusion_and_eval_settings_are_checked_on_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "fdlora.yaml", [override])


def test_federation_reliability_options_name_the_bad_value():
    """round_timeout_s: seconds > 0 or auto; on_short_round: abort, skip or wait; the factor and
    hang_timeout_s in range. Every error names the key and what it accepts."""
    ok = load_config(CONFIGS / "demo.yaml", ["federation.round_timeout_s=auto", "federation.on_short_round=skip",
                                             "federation.hang_timeout_s=30"])
    assert ok.federation.round_timeout_s == "auto" and ok.federation.on_short_round == "skip"
    assert load_config(CONFIGS / "demo.yaml").federation.on_short_round == "abort"  # today's behaviour
    for item, match in [
        ("federation.round_timeout_s=0", r"federation\.round_timeout_s = 0\.0: need seconds > 0, `auto` or nothing"),
        ("federation.round_timeout_s=soon", r"federation\.round_timeout_s = 'soon' is not valid; expected float or one of 'auto'"),
        ("federation.on_short_round=retry", r"federation\.on_short_round = 'retry' is not valid; expected one of 'abort', 'skip', 'wait'"),
        ("federation.round_timeout_factor=0.5", r"federation\.round_timeout_factor = 0\.5.*>= 1"),
        ("federation.hang_timeout_s=0", r"federation\.hang_timeout_s = 0\.0.*> 0"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(CONFIGS / "demo.yaml", [item])


# ---------------------------------------------------------------- settings a strategy would ignore (issue 18, item 1)


@pytest.mark.parametrize("config, overrides, message", [
    ("fedavg.yaml", ["personal.steps_per_round=5"],
     r"strategy fedavg has no per-round personal phase, so personal.steps_per_round = 5 would be ignored"),
    ("diloco.yaml", ["personal.steps_per_round=5"], r"strategy diloco has no per-round personal phase"),
    ("feddpa_f.yaml", ["personal.steps_per_round=5", "feddpa.finetune_steps=20"],
     r"strategy feddpa has no per-round personal phase"),
    ("local.yaml", ["personal.sync_every=2"], r"strategy local trains no global adapter, so personal.sync_every = 2"),
    ("ditto.yaml", ["personal.sync_every=1"], r"strategy ditto .* personal.sync_every = 1 would overwrite v"),
    ("feddpa.yaml", ["personal.sync_every=3"], r"strategy feddpa .* personal.sync_every = 3 would overwrite it"),
    ("fedavg.yaml", ["personal.residual=true"], r"personal.residual is fdlora's stage-2 option; strategy fedavg"),
    ("fdlora.yaml", ["personal.residual=true"], r"strategy fdlora: personal.residual .* needs personal.steps_per_round > 0"),
    ("fdlora.yaml", ["personal.residual=true", "personal.steps_per_round=4", "personal.sync_every=2"],
     r"personal.sync_every = 2 would overwrite it"),
    ("ditto.yaml", ["fusion.fold_back_steps=5"],
     r"fusion.fold_back_steps = 5 trains the personal adapter after fdlora's fusion search; strategy ditto has none"),
    ("fdlora.yaml", ["fusion.bounds=[0.5, 1.5]"], r"fusion.bounds = \[0.5, 1.5\] excludes; .* low <= 0 <= 1 <= high"),
    ("fdlora.yaml", ["fusion.bounds=[-1, 0.9]"], r"fusion.bounds = \[-1.0, 0.9\] excludes"),
    ("diloco.yaml", ["global.combine=product", "outer.momentum_warmup=3"],
     r"outer.momentum_warmup\s+\(= 3\) does not ramp"),
    ("fdlora.yaml", ["personal.sync_every=2", "lora.global.alpha=32"],
     r"personal.sync_every copy weights .* same r, alpha and target_modules .* alpha 8.0 vs 32.0"),
])
def test_a_setting_the_strategy_ignores_is_an_error_naming_it(config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / config, overrides)


@pytest.mark.parametrize("config, overrides", [
    ("fdlora.yaml", ["personal.steps_per_round=5", "personal.residual=true"]),  # fdlora's stage 2
    ("fdlora.yaml", ["personal.steps_per_round=5", "personal.sync_every=2"]),
    ("fdlora.yaml", ["fusion.fold_back_steps=5"]),
    ("local.yaml", ["personal.steps_per_round=5"]),
    ("ditto.yaml", ["personal.steps_per_round=5"]),
    ("feddpa.yaml", ["personal.steps_per_round=5"]),
    ("feddpa_f.yaml", ["personal.steps_per_round=5"]),  # sizes the fine-tune when finetune_steps is left out
    ("fedavg.yaml", ["personal.sync_every=1"]),  # copies, so the privacy test sees them not travel
])
def test_settings_a_strategy_uses_load(config, overrides):
    load_config(CONFIGS / config, overrides)
