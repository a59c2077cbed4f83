"""The configuration tree of a moetrain run.

Owns: the nested, keyword-only dataclasses that describe a run (model, moe, data, train,
checkpoint, cluster, placement, logging), loading them from YAML plus ``--set a.b=c`` overrides,
and validating them once, at the edge, with errors that name the field and the bad value.

Everything downstream takes an already-validated :class:`RunConfig`; nothing else parses YAML.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration error. The message names the offending field."""


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class MoEConfig:
    num_experts: int = 8  # routed experts per MoE layer (E)
    top_k: int = 2  # experts chosen per token (K)
    expert_ffn_dim: int = 128  # hidden size of one SwiGLU expert (F)
    every_n_layers: int = 1  # every Nth transformer block has an MoE FFN (others dense)
    first_moe_layer: int = 0  # index of the first block that may be MoE
    renormalize: bool = True  # renormalise the top-k weights to sum to 1
    num_groups: int = 1  # grouped routing (MoGE): experts in G groups, k/G chosen per group
    num_shared_experts: int = 0  # always-on shared experts (DeepSeekMoE), same ffn dim
    capacity_factor: float = 0.0  # <= 0: dropless; else capacity = ceil(cf * T * K / E)
    expert_bias: bool = False  # aux-loss-free balancing: bias added to scores for selection only
    bias_update_rate: float = 1e-3  # bias += rate * sign(mean_count - count_i), once per step
    dedup: bool = True  # send a token once per destination rank (expert-parallel dispatcher)


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int = 0  # 0: take it from the trained tokenizer
    dim: int = 128  # model width (D)
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: int = 256  # hidden size of dense (non-MoE) SwiGLU FFNs
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass(kw_only=True)
class LossConfig:
    # Auxiliary losses are per MoE layer and SUMMED over MoE layers (Megatron's convention), so a
    # coefficient means the same pressure on every router whatever the depth (docs/load_balancing.md).
    lbl_coeff: float = 2e-2  # load-balancing loss coefficient per MoE layer (0 disables)
    lbl_scope: str = "global"  # micro | global | sequence
    z_loss_coeff: float = 1e-3  # router z-loss coefficient per MoE layer (0 disables)


@dataclass(kw_only=True)
class DataConfig:
    # "builtin" = the embedded corpus from the Python install (stdlib sources + pydoc prose).
    # Otherwise a list of "domain=path" entries; a path is a text file, a directory of text
    # files, a .jsonl file (field `text_field`) or a .parquet file (column `text_field`).
    source: str = "builtin"
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    seq_len: int = 128  # tokens per packed training sequence (<= model.max_seq_len)
    vocab_size: int = 2048  # byte-level BPE vocabulary size
    max_bytes_per_domain: int = 4_000_000  # cap on raw text read per domain
    val_fraction: float = 0.05  # held-out share of packed sequences (deterministic)
    cache_dir: str = ""  # "" = ~/.cache/moetrain (tokenizer + packed data, by content hash)
    seed: int = 0


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 200  # optimizer steps
    global_batch_size: int = 16  # sequences per optimizer step, over all ranks and micro-batches
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # <= 0 disables
    seed: int = 1234
    eval_every: int = 50  # validation every N steps (0: only at the end)
    eval_batches: int = 4  # validation batches per domain
    log_every: int = 10
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass(kw_only=True)
class CheckpointConfig:
    uri: str = ""  # "" = no checkpoints; a local path, s3://bucket/prefix or gs://bucket/prefix
    every: int = 0  # checkpoint every N steps (0 = only at the end, when uri is set)
    keep: int = 3  # committed checkpoints kept (the newest is never deleted)
    async_upload: bool = True  # stream in a background thread while training continues
    resume: str = ""  # "" | "latest" | a step-<N> URI
    s3_endpoint: str = ""  # e.g. http://127.0.0.1:9000 (credentials: AWS_* environment variables)
    s3_region: str = ""
    gcs_endpoint: str = ""  # gs:// only: e.g. an emulator's http://127.0.0.1:4443 (default: Google)
    max_retries: int = 3
    # Local directories: fsync every object (and its directory) before the manifest commits it,
    # so a power loss cannot leave a committed manifest over unwritten data. No effect on
    # S3 / GCS, where a finished upload is already durable. false = page cache only (tmpfs,
    # scratch disks, tests).
    fsync: bool = True


@dataclass(kw_only=True)
class ClusterConfig:
    num_workers: int = 1  # Ray actors, one per rank
    use_gpu: bool = False  # one GPU per worker, NCCL backend
    cpus_per_worker: float = 1.0
    address: str = ""  # "" = RAY_ADDRESS if set, else an embedded local Ray
    max_failures: int = 0  # group rebuilds allowed after a lost actor
    run_name: str = "default"
    torch_threads: int = 0  # 0 = cpu_count / num_workers per worker
    start_timeout_s: float = 300.0  # give up building the worker group after this long


@dataclass(kw_only=True)
class PlacementConfig:
    initial: str = "contiguous"  # contiguous | round_robin | path to a placement JSON
    slots_per_rank: int = 0  # 0 = num_experts / num_workers (no replicas)
    replan_every: int = 0  # steps between re-placement attempts (0 = static placement)
    window: int = 50  # steps of routing statistics used for re-placement
    min_gain: float = 0.05  # relative cost reduction needed to migrate
    solver: str = "ilp"  # ilp | greedy
    time_limit_s: float = 10.0
    load_weight: float = 1.0  # lambda: weight of the makespan term
    migration_weight: float = 0.0  # mu: weight of the migration term
    blocking: bool = False  # wait for each solve at its launch step (deterministic; tests/debugging)


@dataclass(kw_only=True)
class LoggingConfig:
    out_dir: str = "runs"  # run outputs: summary, stats, heatmap PNG, wandb dir
    wandb: str = "offline"  # offline | online | disabled (online needs WANDB_API_KEY)
    wandb_project: str = "moetrain"
    progress: bool = True  # progress bar on the driver


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def micro_batch_size(self) -> int:
        """Sequences per rank per micro-batch."""
        t = self.train
        return t.global_batch_size // (t.grad_accum_steps * self.cluster.num_workers)

    def validate(self) -> "RunConfig":
        validate(self)
        return self


# --------------------------------------------------------------------------------------------
# Building from dicts / YAML / overrides
# --------------------------------------------------------------------------------------------


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {where!r} (known keys here: {known})")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [str(v) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set has an empty key segment: {item!r}")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(raw)
    return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {str(p)!r}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def builtin_config_path(name: str) -> Path:
    """Path of a config shipped inside the package (``tiny``, ``small``)."""
    res = importlib.resources.files("moetrain") / "configs" / f"{name}.yaml"
    return Path(str(res))


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a config: the shipped ``tiny`` default, or ``path``, then ``--set`` overrides."""
    if path is None:
        data = load_yaml(builtin_config_path("tiny"))
    elif not os.path.exists(path) and builtin_config_path(path).is_file():
        data = load_yaml(builtin_config_path(path))
    else:
        data = load_yaml(path)
    data = apply_overrides(data, list(overrides or []))
    cfg = _from_dict(RunConfig, data, "")
    return validate(cfg)


def from_dict(data: dict[str, Any]) -> RunConfig:
    return validate(_from_dict(RunConfig, data, ""))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> RunConfig:
    """Check every cross-field rule once. Raises :class:`ConfigError` naming the field."""
    m, moe, d, t, c = cfg.model, cfg.model.moe, cfg.data, cfg.train, cfg.cluster
    for name, value in [
        ("model.dim", m.dim), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
        ("model.ffn_dim", m.ffn_dim), ("model.max_seq_len", m.max_seq_len),
        ("model.moe.num_experts", moe.num_experts), ("model.moe.top_k", moe.top_k),
        ("model.moe.expert_ffn_dim", moe.expert_ffn_dim), ("model.moe.every_n_layers", moe.every_n_layers),
        ("model.moe.num_groups", moe.num_groups), ("data.seq_len", d.seq_len),
        ("train.steps", t.steps), ("train.global_batch_size", t.global_batch_size),
        ("train.grad_accum_steps", t.grad_accum_steps), ("cluster.num_workers", c.num_workers),
    ]:
        _require(value >= 1, f"{name} ({value}) must be >= 1")
    _require(m.dim % m.n_heads == 0, f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads})")
    _require((m.dim // m.n_heads) % 2 == 0, f"model.dim / model.n_heads ({m.dim // m.n_heads}) must be even for rotary positions")
    _require(moe.top_k <= moe.num_experts, f"model.moe.top_k ({moe.top_k}) must be <= model.moe.num_experts ({moe.num_experts})")
    _require(moe.num_experts % moe.num_groups == 0,
             f"model.moe.num_groups ({moe.num_groups}) must divide model.moe.num_experts ({moe.num_experts})")
    _require(moe.top_k % moe.num_groups == 0,
             f"model.moe.num_groups ({moe.num_groups}) must divide model.moe.top_k ({moe.top_k})")
    _require(moe.first_moe_layer >= 0, f"model.moe.first_moe_layer ({moe.first_moe_layer}) must be >= 0")
    _require(moe.num_shared_experts >= 0, f"model.moe.num_shared_experts ({moe.num_shared_experts}) must be >= 0")
    _require(moe.capacity_factor >= 0, f"model.moe.capacity_factor ({moe.capacity_factor}) must be >= 0 (0 = dropless)")
    _require(d.seq_len <= m.max_seq_len, f"data.seq_len ({d.seq_len}) must be <= model.max_seq_len ({m.max_seq_len})")
    _require(d.vocab_size >= 260, f"data.vocab_size ({d.vocab_size}) must be >= 260 (256 bytes + specials)")
    _require(0 < d.val_fraction < 0.5, f"data.val_fraction ({d.val_fraction}) must be in (0, 0.5)")
    _require(d.source in ("builtin", "paths"), f"data.source ({d.source!r}) must be 'builtin' or 'paths'")
    if d.source == "paths":
        _require(len(d.paths) > 0, "data.paths is empty but data.source is 'paths': give domain=path entries")
    per_step = t.grad_accum_steps * c.num_workers
    _require(t.global_batch_size % per_step == 0,
             f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
             f"train.grad_accum_steps x cluster.num_workers ({t.grad_accum_steps} x {c.num_workers} = {per_step})")
    _require(t.lr > 0, f"train.lr ({t.lr}) must be > 0")
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must be in [0, train.lr]")
    _require(t.warmup_steps >= 0, f"train.warmup_steps ({t.warmup_steps}) must be >= 0")
    _require(t.loss.lbl_scope in ("micro", "global", "sequence"),
             f"train.loss.lbl_scope ({t.loss.lbl_scope!r}) must be one of micro, global, sequence")
    _require(t.loss.lbl_coeff >= 0, f"train.loss.lbl_coeff ({t.loss.lbl_coeff}) must be >= 0")
    _require(t.loss.z_loss_coeff >= 0, f"train.loss.z_loss_coeff ({t.loss.z_loss_coeff}) must be >= 0")
    _require(cfg.checkpoint.keep >= 1, f"checkpoint.keep ({cfg.checkpoint.keep}) must be >= 1")
    _require(cfg.checkpoint.every >= 0, f"checkpoint.every ({cfg.checkpoint.every}) must be >= 0")
    if cfg.checkpoint.resume:
        _require(bool(cfg.checkpoint.uri) or "://" in cfg.checkpoint.resume or cfg.checkpoint.resume != "latest",
                 "checkpoint.resume is 'latest' but checkpoint.uri is empty")
    _require(c.max_failures >= 0, f"cluster.max_failures ({c.max_failures}) must be >= 0")
    _require(c.cpus_per_worker > 0, f"cluster.cpus_per_worker ({c.cpus_per_worker}) must be > 0")
    _require(bool(c.run_name) and "/" not in c.run_name, f"cluster.run_name ({c.run_name!r}) must be non-empty without '/'")
    p = cfg.placement
    _require(p.solver in ("ilp", "greedy"), f"placement.solver ({p.solver!r}) must be 'ilp' or 'greedy'")
    slots = p.slots_per_rank or (moe.num_experts // c.num_workers)
    if p.slots_per_rank == 0:
        _require(moe.num_experts % c.num_workers == 0,
                 f"model.moe.num_experts ({moe.num_experts}) must be divisible by cluster.num_workers "
                 f"({c.num_workers}), or set placement.slots_per_rank")
    _require(slots * c.num_workers >= moe.num_experts,
             f"placement.slots_per_rank ({slots}) x cluster.num_workers ({c.num_workers}) must be >= "
             f"model.moe.num_experts ({moe.num_experts})")
    _require(p.replan_every >= 0, f"placement.replan_every ({p.replan_every}) must be >= 0")
    _require(cfg.logging.wandb in ("offline", "online", "disabled"),
             f"logging.wandb ({cfg.logging.wandb!r}) must be offline, online or disabled")
    return cfg
