"""Run configuration: pydantic models loaded from YAML with strict keys.

One module per concern, each importing only those before it (no cycle):
    errors.py       ConfigError and the wording of every error (the key, the value, what is allowed)
    loading.py      a file as a raw mapping: strict YAML, `include:`, `--set` overrides, merge
    sections.py     one model per YAML section, each field documented where it is declared
    federation.py   the federation's sections on the same terms: outer, global, federation, privacy
    deepspeed.py    the DeepSpeed dict of one client, built from the config
    root.py         Config (the sections and the checks across them), load_config, config_from_dict
    environment.py  the checks that need installed packages (check_environment), run by the CLI

    cfg = load_config("configs/demo.yaml", overrides=["train.rounds=5"])
    check_environment(cfg, "configs/demo.yaml")
"""

from .deepspeed import deepspeed_dict
from .environment import check_environment
from .errors import ConfigError
from .loading import MAX_VALUES, apply_override, merge, read_yaml
from .root import Config, config_from_dict, load_config
from .federation import (OUTER_DEFAULTS, OUTER_OPTIMIZER_DEFAULTS, FederationConfig, GlobalConfig, OuterConfig,
                         PrivacyConfig, resolve_outer)
from .sections import (MAX_RANKS, AdapterConfig, CheckpointConfig, ClientOverride, DataConfig, DittoConfig,
                       EvalConfig, FedDPAConfig, FusionConfig, LogConfig, LoraConfig, ModelConfig, PersonalConfig,
                       Section, TopologyConfig, TrainConfig)

__all__ = ["AdapterConfig", "CheckpointConfig", "ClientOverride", "Config", "ConfigError", "DataConfig", "DittoConfig",
           "EvalConfig", "FedDPAConfig", "FederationConfig", "FusionConfig", "GlobalConfig", "LogConfig", "LoraConfig",
           "MAX_RANKS", "MAX_VALUES", "ModelConfig", "OUTER_DEFAULTS", "OUTER_OPTIMIZER_DEFAULTS", "OuterConfig",
           "PersonalConfig", "PrivacyConfig", "Section", "TopologyConfig", "TrainConfig", "apply_override", "check_environment",
           "config_from_dict", "deepspeed_dict", "load_config", "merge", "read_yaml", "resolve_outer"]
