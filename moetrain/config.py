"""The configuration tree of a moetrain run.

Owns: the nested, keyword-only dataclasses that describe a run (model, moe, data, train,
checkpoint, storage, cluster, placement, logging), loading them from YAML plus ``--set a.b=c`` overrides,
and validating them once, at the edge, with errors that name the field and the bad value.

Everything downstream takes an already-validated :class:`RunConfig`; nothing else parses YAML.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re
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
    a2a_chunks: int = 1  # pipeline each layer's all-to-all in this many token chunks (overlap with experts)
    # flat: one all-to-all over all ranks; hierarchical: a token crosses to a remote node once, is
    # forwarded inside it, and its weighted partial sum comes back once (docs/multinode.md)
    dispatch: str = "flat"
    # node-limited routing (DeepSeek-V3): each token's experts on at most this many nodes, chosen
    # by the sum of their best ceil(top_k / M) scores; an expert's node is its primary replica's; 0 = off
    max_nodes_per_token: int = 0
    # softmax_topk: softmax over all E experts, then top-k (optionally renormalised: `renormalize`);
    # topk_softmax: top-k over the logits, then softmax over the k (Mixtral).
    router: str = "softmax_topk"
    shared_expert_ffn_dim: int = 0  # hidden size of each shared expert (0 = expert_ffn_dim)
    shared_expert_gate: bool = False  # scale the shared experts' output by sigmoid(x . w) (Qwen2-MoE)


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int = 0  # 0: take it from the trained tokenizer
    dim: int = 128  # model width (D)
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = n_heads
    qk_norm: bool = False  # RMSNorm on the query and key projections (OLMoE)
    qkv_bias: bool = False  # bias on the query/key/value projections (Qwen2)
    ffn_dim: int = 256  # hidden size of dense (non-MoE) SwiGLU FFNs
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    init_from: str = ""  # "" = random init (seeded); "hf:DIR" = weights of a Hugging Face checkpoint
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
    tokenizer: str = "bpe"  # bpe = byte-level BPE trained on the corpus; hf:DIR = DIR/tokenizer.json
    seq_len: int = 128  # tokens per packed training sequence (<= model.max_seq_len)
    vocab_size: int = 2048  # byte-level BPE vocabulary size
    max_bytes_per_domain: int = 4_000_000  # cap on raw text read per domain
    val_fraction: float = 0.05  # held-out share of packed sequences (deterministic)
    cache_dir: str = ""  # "" = ~/.cache/moetrain (tokenizer + packed data, by content hash)
    seed: int = 0
    # source "prepared": the output of `moetrain prepare` (a local path, s3://bucket/prefix or
    # gs://bucket/prefix), streamed shard by shard; endpoints in the `storage` section.
    prepared_uri: str = ""
    # ["domain=weight", ...]: share of each domain in every global batch (normalised; a domain
    # left out gets weight 0). Empty = every domain in proportion to its training rows.
    mixture: list[str] = field(default_factory=list)
    # shuffled: ranks get random rows of the global batch; domain: the same rows per micro-batch,
    # reordered so that each rank's slice is as domain-homogeneous as the mixture allows.
    rank_assignment: str = "shuffled"


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
    max_nonfinite_skips: int = 0  # steps with a NaN/inf loss or grad norm skipped before the run fails
    # fp32 | bf16 | auto (bf16 where bf16 matmul is native: CUDA sm80+, CPUs with AMX or
    # AVX512-BF16). bf16 keeps fp32 master weights and optimizer state.
    precision: str = "fp32"
    zero_stage: int = 0  # DeepSpeed ZeRO stage for the dense parameters: 0 (off), 1 or 2
    activation_checkpointing: str = "none"  # none | block | attention
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass(kw_only=True)
class CheckpointConfig:
    uri: str = ""  # "" = no checkpoints; a local path, s3://bucket/prefix or gs://bucket/prefix
    every: int = 0  # checkpoint every N steps (0 = only at the end, when uri is set)
    keep: int = 3  # committed checkpoints kept (the newest is never deleted)
    async_upload: bool = True  # stream in a background thread while training continues
    max_consecutive_failures: int = 3  # the run fails after this many failed checkpoints in a row (0: never)
    overwrite: bool = False  # a new run (no resume) may delete committed checkpoints of the same run name
    resume: str = ""  # "" | "latest" | a step-<N> URI (endpoints in the `storage` section)
    max_retries: int = 3
    # Local directories: fsync every object (and its directory) before the manifest commits it,
    # so a power loss cannot leave a committed manifest over unwritten data. No effect on
    # S3 / GCS, where a finished upload is already durable. false = page cache only (tmpfs,
    # scratch disks, tests).
    fsync: bool = True
    # Checksum of every object, recorded per object in the manifest and checked on every read:
    # crc32c (hardware CRC-32C, what S3 and GCS use themselves; ~11 GB/s per core) or sha256
    # (~1.7 GB/s per core). Checkpoints written with either are readable whatever this says.
    checksum: str = "crc32c"
    # A run holds a lease on its name in the store (<uri>/<run>/lease.json), renewed every
    # lease_ttl_s / 4: a second run of the same name is refused while it is live. A run killed
    # without releasing it (SIGKILL) blocks its name for up to this long (or `moetrain ckpt unlock`).
    lease_ttl_s: float = 60.0


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """Where the object stores are: one set of endpoints for every s3:// and gs:// URI of a run
    (checkpoints, prepared data, tokenizers, Hugging Face import / export); opened by
    :mod:`moetrain.storage`. Credentials never go here: AWS_* variables, or Application Default
    Credentials (GOOGLE_APPLICATION_CREDENTIALS)."""

    s3_endpoint: str = ""  # s3:// only, e.g. http://127.0.0.1:9000 ("" = AWS_ENDPOINT_URL(_S3) or AWS)
    s3_region: str = ""  # s3:// only ("" = AWS_REGION, else asked of the bucket; us-east-1 with an endpoint)
    gcs_endpoint: str = (
        ""  # gs:// only, e.g. an emulator's http://127.0.0.1:4443 ("" = STORAGE_EMULATOR_HOST or Google)
    )


@dataclass(kw_only=True)
class ClusterConfig:
    num_workers: int = 1  # Ray actors, one per rank
    use_gpu: bool = False  # one GPU per worker, NCCL backend
    cpus_per_worker: float = 1.0
    address: str = ""  # "" = RAY_ADDRESS if set, else an embedded local Ray
    max_failures: int = 0  # group rebuilds allowed after a lost actor
    run_name: str = "default"
    torch_threads: int = 0  # 0 = the rank's own CPU bundle: cpus_per_worker (at least 1)
    start_timeout_s: float = 300.0  # give up building the worker group after this long
    connect_timeout_s: float = 30.0  # give up reaching cluster.address / RAY_ADDRESS after this long
    collective_timeout_s: float = 300.0  # a torch.distributed collective waiting longer fails its rank
    # The group is one Ray placement group (a bundle per rank) placed with this strategy:
    # PACK (fill nodes), SPREAD, STRICT_PACK (one node), STRICT_SPREAD (one rank per node).
    placement_strategy: str = "PACK"
    # After a node is lost, wait up to this long for the nodes left (or new ones) to fit the group.
    node_wait_s: float = 60.0
    # The rank -> node map is read from where the ranks landed (nodes may hold different numbers);
    # the cost model charges a token sent to another node placement.inter_node_cost, one inside 1.
    # Set > 0 only as a check: a run whose nodes do not each hold this many ranks fails.
    ranks_per_node: int = 0
    step_timeout_s: float = 60.0  # watchdog: a step slower than the slowest seen + this fails its ranks
    # Embedded local Ray only (ignored when joining a cluster): serve the Ray dashboard on
    # 127.0.0.1 while the run lasts, at dashboard_port (0 = 8265, or the next free port above it).
    dashboard: bool = True
    dashboard_port: int = 0
    # Elastic size: the run asks for num_workers, starts once min_workers fit (0 = num_workers: a
    # fixed size) and, at step boundaries, grows toward num_workers when the cluster has room
    # (looked at every resize_check_s), moving state from memory; a lost node shrinks it to what
    # fits (not below min_workers). Only sizes the rest of the config allows are used.
    min_workers: int = 0
    resize_check_s: float = 30.0


@dataclass(kw_only=True)
class PlacementConfig:
    initial: str = "contiguous"  # contiguous | round_robin | path to a placement JSON
    slots_per_rank: int = 0  # 0 = num_experts / num_workers (no replicas)
    replan_every: int = 0  # steps between re-placement attempts (0 = static placement)
    window: int = 50  # optimizer steps of routing statistics the solver sees (a moving window)
    sample_tokens: int = 8192  # per-token top-k ids kept from the window, all ranks together
    min_gain: float = 0.05  # relative cost reduction needed to migrate
    method: str = "ilp"  # ilp | local_search | greedy | validated (placement.solve_placement's method)
    # newest share of the window's sampled steps that validates (placement/select.py): the
    # proposal is fitted on the older steps and min_gain is judged on these; 0 = judge on the fit
    val_fraction: float = 0.25
    time_limit_s: float = 10.0
    load_weight: float = 1.0  # lambda: weight of the makespan term
    migration_weight: float = 0.0  # mu: weight of the migration term
    inter_node_cost: float = 4.0  # cost of a token row sent to another node (one inside a node costs 1)
    # Score each sampled token's sends from its home rank (the rank that routed it): pays off
    # with data.rank_assignment=domain. false = the domain-agnostic model (uniform origin).
    home_ranks: bool = True
    blocking: bool = False  # wait for each solve at its launch step (deterministic; tests/debugging)
    # none | node | rank: keep as many experts per layer as the slots allow on two fault domains
    # (the ranks of one node / each rank), the hottest first (placement/domains.py); the run logs
    # the experts left single-homed whenever a placement is chosen
    fault_domain: str = "none"


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
    storage: StoreConfig = field(default_factory=StoreConfig)
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


# old key -> new key, for a clear error
RENAMED = {
    "placement.solver": "placement.method",
    **{
        f"{section}.{key}": f"storage.{key}"
        for section in ("data", "checkpoint")
        for key in ("s3_endpoint", "s3_region", "gcs_endpoint")
    },
}


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            if where in RENAMED:
                raise ConfigError(f"config key {where!r} was renamed {RENAMED[where]!r}")
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {where!r} (known keys here: {known})")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
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


def _check_unique_keys(node: Any, path: str = "") -> None:
    """Refuse a key given twice in one YAML mapping (PyYAML would keep the last silently),
    naming its dotted path and both lines."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            where = f"{path}.{key}" if path else key
            if key in seen:
                raise ConfigError(
                    f"key {where!r} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}): remove one"
                )
            seen[key] = key_node.start_mark.line + 1
            _check_unique_keys(value_node, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{i}]")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {str(p)!r}")
    try:
        text = p.read_text(encoding="utf-8")
        _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"config file {str(p)!r}: {exc}") from None
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


PLACEMENT_METHODS = ("ilp", "local_search", "greedy", "validated")
PLACEMENT_FAULT_DOMAINS = ("none", "node", "rank")  # placement.domains.FAULT_DOMAINS
PRECISIONS = ("auto", "fp32", "bf16")
ACTIVATION_CHECKPOINTING = ("none", "block", "attention")
ROUTERS = ("softmax_topk", "topk_softmax")
DISPATCH_MODES = ("flat", "hierarchical")
DATA_SOURCES = ("builtin", "paths", "prepared")
RANK_ASSIGNMENTS = ("shuffled", "domain")


def parse_mixture(entries: list[str]) -> dict[str, float]:
    """``["code=3", "english=1"]`` -> ``{"code": 3.0, "english": 1.0}`` (data.mixture); weights
    finite and >= 0, not all 0, each domain once."""
    out: dict[str, float] = {}
    for entry in entries:
        name, sep, raw = entry.partition("=")
        name = name.strip()
        try:
            weight = float(raw)
        except ValueError:
            weight = math.nan
        _require(
            bool(sep) and bool(name) and math.isfinite(weight) and weight >= 0,
            f"data.mixture entry {entry!r} must look like 'domain=WEIGHT' with a finite WEIGHT >= 0",
        )
        _require(name not in out, f"data.mixture names domain {name!r} more than once")
        out[name] = weight
    _require(not out or sum(out.values()) > 0, f"data.mixture ({','.join(entries)}) has no positive weight")
    return out


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT``, or None when it is not of that form."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# Every numeric field's valid interval ("[" / "]" closed, "(" / ")" open; floats must be finite).
# tests/test_config.py checks that each int / float field of the tree is listed here.
RANGES = {
    "model.vocab_size": "[0, inf)",
    "model.dim": "[1, inf)",
    "model.n_layers": "[1, inf)",
    "model.n_heads": "[1, inf)",
    "model.n_kv_heads": "[0, inf)",
    "model.ffn_dim": "[1, inf)",
    "model.max_seq_len": "[1, inf)",
    "model.rope_theta": "(0, inf)",
    "model.norm_eps": "(0, 1)",
    "model.init_std": "(0, inf)",
    "model.moe.num_experts": "[1, inf)",
    "model.moe.top_k": "[1, inf)",
    "model.moe.expert_ffn_dim": "[1, inf)",
    "model.moe.every_n_layers": "[1, inf)",
    "model.moe.first_moe_layer": "[0, inf)",
    "model.moe.num_groups": "[1, inf)",
    "model.moe.num_shared_experts": "[0, inf)",
    "model.moe.capacity_factor": "[0, inf)",
    "model.moe.a2a_chunks": "[1, inf)",
    "model.moe.max_nodes_per_token": "[0, inf)",
    "model.moe.shared_expert_ffn_dim": "[0, inf)",
    "model.moe.bias_update_rate": "[0, inf)",
    "data.seq_len": "[1, inf)",
    "data.vocab_size": "[260, inf)",
    "data.max_bytes_per_domain": "[1, inf)",
    "data.val_fraction": "(0, 0.5)",
    "data.seed": "[0, inf)",
    "train.steps": "[1, inf)",
    "train.global_batch_size": "[1, inf)",
    "train.grad_accum_steps": "[1, inf)",
    "train.lr": "(0, inf)",
    "train.min_lr": "[0, inf)",
    "train.warmup_steps": "[0, inf)",
    "train.weight_decay": "[0, inf)",
    "train.beta1": "[0, 1)",
    "train.beta2": "[0, 1)",
    "train.grad_clip": "(-inf, inf)",
    "train.seed": "[0, inf)",
    "train.eval_every": "[0, inf)",
    "train.eval_batches": "[1, inf)",
    "train.log_every": "[1, inf)",
    "train.max_nonfinite_skips": "[0, inf)",
    "train.zero_stage": "[0, 2]",
    "train.loss.lbl_coeff": "[0, inf)",
    "train.loss.z_loss_coeff": "[0, inf)",
    "checkpoint.every": "[0, inf)",
    "checkpoint.keep": "[1, inf)",
    "checkpoint.max_consecutive_failures": "[0, inf)",
    "checkpoint.max_retries": "[0, inf)",
    "checkpoint.lease_ttl_s": "[1, 86400]",
    "cluster.num_workers": "[1, inf)",
    "cluster.cpus_per_worker": "(0, inf)",
    "cluster.max_failures": "[0, inf)",
    "cluster.torch_threads": "[0, inf)",
    "cluster.start_timeout_s": "(0, inf)",
    "cluster.connect_timeout_s": "(0, inf)",
    "cluster.collective_timeout_s": "(0, inf)",
    "cluster.step_timeout_s": "(0, inf)",
    "cluster.node_wait_s": "[0, inf)",
    "cluster.dashboard_port": "[0, 65535]",
    "cluster.ranks_per_node": "[0, inf)",
    "cluster.min_workers": "[0, inf)",
    "cluster.resize_check_s": "(0, inf)",
    "placement.inter_node_cost": "[1, inf)",
    "placement.slots_per_rank": "[0, inf)",
    "placement.replan_every": "[0, inf)",
    "placement.window": "[1, inf)",
    "placement.sample_tokens": "[0, inf)",
    "placement.min_gain": "(-inf, inf)",
    "placement.time_limit_s": "(0, inf)",
    "placement.load_weight": "[0, inf)",
    "placement.migration_weight": "[0, inf)",
    "placement.val_fraction": "[0, 1)",
}
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a path segment and an actor-name part


def field_value(cfg: Any, path: str) -> Any:
    """The value at dotted ``path`` below ``cfg`` (a config node)."""
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _check_range(path: str, value: float, interval: str) -> None:
    lo_s, hi_s = interval[1:-1].split(",")
    lo, hi = float(lo_s), float(hi_s)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path} ({value}) must be a finite number")
    ok_lo = value >= lo if interval[0] == "[" else value > lo
    ok_hi = value <= hi if interval[-1] == "]" else value < hi
    _require(ok_lo and ok_hi, f"{path} ({value}) must be in {interval}")


def _check_ranges(node: Any, prefix: str, skip: str | None = None) -> None:
    """The :data:`RANGES` of the fields below ``prefix`` (``node`` is the config at ``prefix``),
    except those below ``skip``."""
    for path, interval in RANGES.items():
        if path.startswith(prefix) and not (skip and path.startswith(skip)):
            _check_range(path, field_value(node, path[len(prefix) :]), interval)


def validate(cfg: RunConfig) -> RunConfig:
    """Check every field's range and every cross-field rule once. Raises :class:`ConfigError`
    naming the field and the bad value."""
    validate_model(cfg.model)
    _check_ranges(cfg, "", skip="model.")
    _validate_run_model(cfg)
    _validate_data(cfg)
    _validate_run(cfg)
    _validate_placement(cfg)
    _validate_elastic(cfg)
    _validate_no_credentials(cfg)
    return cfg


def sized(cfg: RunConfig, num_workers: int) -> RunConfig:
    """``cfg`` for a group of ``num_workers`` ranks (an elastic run's current size): the other
    fields as they are; raises :class:`ConfigError` if the config does not allow that size."""
    c = dataclasses.replace(cfg.cluster, num_workers=num_workers, min_workers=min(cfg.cluster.min_workers, num_workers))
    out = dataclasses.replace(cfg, cluster=c)
    _validate_run(out)
    _validate_placement(out)
    return out


def elastic_sizes(cfg: RunConfig) -> list[int]:
    """The group sizes an elastic run may take, ascending: from ``cluster.min_workers`` to
    ``cluster.num_workers``, those the global batch, the experts and the node layout allow."""
    c = cfg.cluster
    out = []
    for n in range(c.min_workers or c.num_workers, c.num_workers + 1):
        try:
            sized(cfg, n)
        except ConfigError:
            continue
        out.append(n)
    return out


def _validate_elastic(cfg: RunConfig) -> None:
    c = cfg.cluster
    if not c.min_workers or c.min_workers == c.num_workers:
        return
    _require(
        c.min_workers <= c.num_workers,
        f"cluster.min_workers ({c.min_workers}) must be <= cluster.num_workers ({c.num_workers})",
    )
    try:
        sized(cfg, c.min_workers)
    except ConfigError as exc:
        raise ConfigError(f"cluster.min_workers ({c.min_workers}) is not a size this run allows: {exc}") from None


def redacted_url(value: str) -> str:
    """``scheme://***@host[:port]/path`` for a URL with user info: nothing before the last '@'
    of the URL's authority is kept (the query string is dropped too)."""
    if "://" not in value:  # an endpoint given without a scheme
        return f"***@{value.rpartition('@')[2]}"
    i = value.index("://")
    j = i
    while j > 0 and (value[j - 1].isalnum() or value[j - 1] in "+.-"):
        j -= 1
    rest = value[i + 3 :]
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        host_path = authority.rpartition("@")[2] + slash + path
    else:  # the secret held a '/': keep only what follows the last '@'
        host_path = rest.rpartition("@")[2]
    return f"{value[j:i]}://***@{host_path.split('?', 1)[0]}"


def _url_has_credentials(value: str, endpoint: bool) -> bool:
    """A ``scheme://user[:secret]@host`` URL (also behind a prefix such as ``hf:`` or ``name=``).
    In an endpoint (no path of its own) any '@' counts, wherever a '/' in the secret put it."""
    if endpoint:
        return "@" in value
    if "://" not in value:
        return False
    rest = value.partition("://")[2]
    return "@" in (rest if endpoint else rest.split("/", 1)[0])


def _validate_no_credentials(cfg: RunConfig) -> None:
    """No endpoint or URI field carries credentials (``http://KEY:SECRET@host``): they would reach
    logs, manifests and DNS. Refused naming the field; the message never repeats the secret."""

    def walk(node: Any, path: str) -> None:
        for f in dataclasses.fields(node):
            value, where = getattr(node, f.name), f"{path}.{f.name}" if path else f.name
            if dataclasses.is_dataclass(value):
                walk(value, where)
                continue
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and _url_has_credentials(item, f.name.endswith("endpoint")):
                    raise ConfigError(
                        f"{where} holds credentials in its URL ({redacted_url(item)}): give only scheme://host:port "
                        "there, and the keys in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or "
                        "GOOGLE_APPLICATION_CREDENTIALS)"
                    )

    walk(cfg, "")


def validate_model(m: ModelConfig, *, building: bool = False) -> None:
    """The one check of the model settings: every ``model.*`` range and every rule between model
    fields, raising :class:`ConfigError` naming the field. :func:`validate` calls it for a run;
    the model calls it with ``building=True`` before it builds (``model.vocab_size`` must then be
    set); :func:`validate_moe` is its ``model.moe`` part, which the router calls."""
    if building:
        _require(
            m.vocab_size > 0,
            f"model.vocab_size ({m.vocab_size}) must be > 0: set it from the trained "
            "tokenizer before building the model",
        )
    _check_ranges(m, "model.", skip="model.moe.")
    _require(m.dim % m.n_heads == 0, f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads})")
    _require(
        (m.dim // m.n_heads) % 2 == 0,
        f"model.dim / model.n_heads ({m.dim // m.n_heads}) must be even for rotary positions",
    )
    kv = m.n_kv_heads or m.n_heads
    _require(m.n_heads % kv == 0, f"model.n_kv_heads ({m.n_kv_heads}) must divide model.n_heads ({m.n_heads})")
    _require(
        m.init_from == "" or (m.init_from.startswith("hf:") and len(m.init_from) > 3),
        f"model.init_from ({m.init_from!r}) must be empty or hf:DIR",
    )
    validate_moe(m.moe)
    first = m.moe.first_moe_layer
    _require(
        first < m.n_layers, f"model.moe.first_moe_layer ({first}) must be < model.n_layers ({m.n_layers}): no MoE layer"
    )


def validate_moe(moe: MoEConfig) -> None:
    """The ``model.moe`` part of :func:`validate_model`: every ``model.moe.*`` range and every
    rule between the routing fields."""
    _check_ranges(moe, "model.moe.")
    _require(
        moe.top_k <= moe.num_experts,
        f"model.moe.top_k ({moe.top_k}) must be <= model.moe.num_experts ({moe.num_experts})",
    )
    _require(
        moe.num_experts % moe.num_groups == 0,
        f"model.moe.num_groups ({moe.num_groups}) must divide model.moe.num_experts ({moe.num_experts})",
    )
    _require(
        moe.top_k % moe.num_groups == 0,
        f"model.moe.num_groups ({moe.num_groups}) must divide model.moe.top_k ({moe.top_k})",
    )
    _require(moe.router in ROUTERS, f"model.moe.router ({moe.router!r}) must be one of {', '.join(ROUTERS)}")
    _require(
        moe.dispatch in DISPATCH_MODES,
        f"model.moe.dispatch ({moe.dispatch!r}) must be one of {', '.join(DISPATCH_MODES)}",
    )
    if moe.dispatch == "hierarchical":
        _require(
            moe.dedup, "model.moe.dispatch=hierarchical sends once per node and per rank: it needs model.moe.dedup=true"
        )
        _require(
            moe.a2a_chunks == 1,
            f"model.moe.a2a_chunks ({moe.a2a_chunks}) must be 1 with model.moe.dispatch=hierarchical",
        )
    _require(
        moe.max_nodes_per_token == 0 or moe.num_groups == 1,
        f"model.moe.max_nodes_per_token ({moe.max_nodes_per_token}) and model.moe.num_groups ({moe.num_groups}) "
        "cannot both limit the routing: set one of them",
    )


def _validate_run_model(cfg: RunConfig) -> None:
    """Rules between the model and the rest of the run."""
    m, d = cfg.model, cfg.data
    _require(
        m.vocab_size == 0 or m.vocab_size >= 260,
        f"model.vocab_size ({m.vocab_size}) must be 0 (from the tokenizer) or >= 260",
    )
    _require(d.seq_len <= m.max_seq_len, f"data.seq_len ({d.seq_len}) must be <= model.max_seq_len ({m.max_seq_len})")


def _validate_data(cfg: RunConfig) -> None:
    d = cfg.data
    _require(
        d.tokenizer == "bpe" or (d.tokenizer.startswith("hf:") and len(d.tokenizer) > 3),
        f"data.tokenizer ({d.tokenizer!r}) must be 'bpe' or hf:DIR",
    )
    _require(d.source in DATA_SOURCES, f"data.source ({d.source!r}) must be one of {', '.join(DATA_SOURCES)}")
    if d.source == "paths":
        _require(len(d.paths) > 0, "data.paths is empty but data.source is 'paths': give domain=path entries")
    _require(
        d.source != "prepared" or bool(d.prepared_uri),
        "data.prepared_uri is empty but data.source is 'prepared': give the output URI of `moetrain prepare`",
    )
    _require(
        d.rank_assignment in RANK_ASSIGNMENTS,
        f"data.rank_assignment ({d.rank_assignment!r}) must be one of {', '.join(RANK_ASSIGNMENTS)}",
    )
    parse_mixture(d.mixture)


def _validate_run(cfg: RunConfig) -> None:
    t, c = cfg.train, cfg.cluster
    per_step = t.grad_accum_steps * c.num_workers
    _require(
        t.global_batch_size % per_step == 0,
        f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
        f"train.grad_accum_steps x cluster.num_workers ({t.grad_accum_steps} x {c.num_workers} = {per_step})",
    )
    _require(t.precision in PRECISIONS, f"train.precision ({t.precision!r}) must be one of {', '.join(PRECISIONS)}")
    _require(
        t.activation_checkpointing in ACTIVATION_CHECKPOINTING,
        f"train.activation_checkpointing ({t.activation_checkpointing!r}) must be one of "
        f"{', '.join(ACTIVATION_CHECKPOINTING)}",
    )
    _require(t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must be in [0, train.lr]")
    _require(
        t.loss.lbl_scope in ("micro", "global", "sequence"),
        f"train.loss.lbl_scope ({t.loss.lbl_scope!r}) must be one of micro, global, sequence",
    )
    _require(
        cfg.checkpoint.checksum in ("crc32c", "sha256"),
        f"checkpoint.checksum ({cfg.checkpoint.checksum!r}) must be 'crc32c' or 'sha256'",
    )
    if cfg.checkpoint.resume:
        _require(
            bool(cfg.checkpoint.uri) or "://" in cfg.checkpoint.resume or cfg.checkpoint.resume != "latest",
            "checkpoint.resume is 'latest' but checkpoint.uri is empty",
        )
    if c.address and not c.address.startswith(("ray://", "auto")):
        _require(
            _host_port(c.address) is not None,
            f"cluster.address ({c.address!r}) must be HOST:PORT (e.g. 10.0.0.1:6379), ray://HOST:PORT or auto",
        )
    _require(
        c.placement_strategy in PLACEMENT_STRATEGIES,
        f"cluster.placement_strategy ({c.placement_strategy!r}) must be one of {', '.join(PLACEMENT_STRATEGIES)}",
    )
    _require(
        RUN_NAME.fullmatch(c.run_name) is not None,
        f"cluster.run_name ({c.run_name!r}) must be 1-128 letters, digits, '.', '_' or '-', starting with a "
        "letter or digit (it names checkpoint folders and Ray actors)",
    )
    _require(
        cfg.logging.wandb in ("offline", "online", "disabled"),
        f"logging.wandb ({cfg.logging.wandb!r}) must be offline, online or disabled",
    )


def _validate_placement(cfg: RunConfig) -> None:
    p, moe, c = cfg.placement, cfg.model.moe, cfg.cluster
    _require(
        p.method in PLACEMENT_METHODS, f"placement.method ({p.method!r}) must be one of {', '.join(PLACEMENT_METHODS)}"
    )
    _require(
        p.fault_domain in PLACEMENT_FAULT_DOMAINS,
        f"placement.fault_domain ({p.fault_domain!r}) must be one of {', '.join(PLACEMENT_FAULT_DOMAINS)}",
    )
    slots = p.slots_per_rank or (moe.num_experts // c.num_workers)
    if p.slots_per_rank == 0:
        _require(
            moe.num_experts % c.num_workers == 0,
            f"model.moe.num_experts ({moe.num_experts}) must be divisible by cluster.num_workers "
            f"({c.num_workers}), or set placement.slots_per_rank",
        )
    _require(
        c.ranks_per_node == 0 or c.num_workers % c.ranks_per_node == 0,
        f"cluster.ranks_per_node ({c.ranks_per_node}) must divide cluster.num_workers ({c.num_workers})",
    )
    _require(
        slots * c.num_workers >= moe.num_experts,
        f"placement.slots_per_rank ({slots}) x cluster.num_workers ({c.num_workers}) must be >= "
        f"model.moe.num_experts ({moe.num_experts})",
    )
