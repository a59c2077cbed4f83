"""The configuration tree of a moetrain run.

Owns the nested, keyword-only dataclasses that describe a run (model, moe, data, train,
checkpoint, storage, cluster, placement, logging; ``schema``), loading them from YAML plus
``--set a.b=c`` overrides (``build``), and validating them once, at the edge, with errors that
name the field and the bad value (``checks``). Every name is re-exported here.

Everything downstream takes an already-validated :class:`RunConfig`; nothing else parses YAML.
"""

from __future__ import annotations

from moetrain.config.build import (  # noqa: F401
    RENAMED,
    _from_dict,
    _coerce,
    _parse_scalar,
    apply_overrides,
    _check_unique_keys,
    load_yaml,
    builtin_config_path,
    load_config,
    from_dict,
)
from moetrain.config.checks import (  # noqa: F401
    PLACEMENT_METHODS,
    PLACEMENT_FAULT_DOMAINS,
    PRECISIONS,
    ACTIVATION_CHECKPOINTING,
    ROUTERS,
    DISPATCH_MODES,
    DATA_SOURCES,
    RANK_ASSIGNMENTS,
    parse_mixture,
    _host_port,
    _require,
    RANGES,
    PLACEMENT_STRATEGIES,
    RUN_NAME,
    field_value,
    _check_range,
    _check_ranges,
    validate,
    sized,
    elastic_sizes,
    _validate_elastic,
    redacted_url,
    _url_has_credentials,
    _validate_no_credentials,
    validate_model,
    validate_moe,
    _validate_run_model,
    _validate_data,
    _validate_run,
    _validate_placement,
)
from moetrain.config.schema import (  # noqa: F401
    ConfigError,
    MoEConfig,
    ModelConfig,
    LossConfig,
    DataConfig,
    TrainConfig,
    CheckpointConfig,
    StoreConfig,
    ClusterConfig,
    PlacementConfig,
    LoggingConfig,
    RunConfig,
)
