"""Recipes: YAML → frozen, nested dataclasses, with every section's keys and defaults in one place.

A recipe is a YAML file whose sections mirror the dataclasses of `posttrain.config.sections` (`model:`, `chat:`,
`data:` …, then one section per stage), gathered by `Recipe` (`posttrain.config.recipe`). Loading is strict
(`posttrain.config.loader`):

- an unknown key is an error that names the file, the line, the key and the closest valid key;
- a value of the wrong type is an error that names the same and the type expected;
- cross-field problems (each dataclass's `problems()`) are collected and raised together, one line each;
- `extends: other.yaml` (relative to the file) inherits a recipe; keys set here override it, mappings merge
  key by key, lists are replaced whole; `extends` may be chained;
- `--set a.b=value` overrides any key from the command line (the value is parsed as YAML).

Every problem found is reported in one `ConfigError`, before any model loads. Defaults live only in the
dataclasses. `config_hash` gives a stable hash of any section (key order and file layout do not change it).
"""

from posttrain.config.loader import (
    ConfigError,
    apply_overrides,
    config_hash,
    dump_yaml,
    from_dict,
    load_raw,
    load_recipe,
    load_recipe_located,
    to_dict,
    where_of,
)
from posttrain.config.recipe import LAUNCHERS, Recipe, launcher_file, launcher_processes
from posttrain.config.sections import (
    IF_SET,
    ChatConfig,
    DataConfig,
    DefectRates,
    DistillConfig,
    DistillTrainConfig,
    Divergence,
    EvalConfig,
    FilterConfig,
    LoraSpec,
    MergeConfig,
    ModelSpec,
    RewardTrainConfig,
    RLConfig,
    RLRun,
    RLTrainConfig,
    RMConfig,
    SamplingConfig,
    TrackingConfig,
    TrainConfig,
    WorldConfig,
    trl_key_problems,
)

__all__ = [
    "IF_SET", "LAUNCHERS", "ChatConfig", "ConfigError", "DataConfig", "DefectRates", "DistillConfig", "DistillTrainConfig", "Divergence",
    "EvalConfig", "FilterConfig", "LoraSpec", "MergeConfig", "ModelSpec", "RLConfig", "RLRun", "RLTrainConfig", "RMConfig", "Recipe", "RewardTrainConfig",
    "SamplingConfig", "TrackingConfig", "TrainConfig", "WorldConfig", "apply_overrides", "config_hash", "dump_yaml",
    "from_dict", "launcher_file", "launcher_processes", "load_raw", "load_recipe", "load_recipe_located", "to_dict",
    "trl_key_problems", "where_of",
]  # fmt: skip
