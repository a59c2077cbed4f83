"""Checking a :class:`~moetrain.config.schema.RunConfig` once, at the edge: every field's range
and every rule between fields, with errors that name the field and the bad value; and the group
sizes an elastic run may take (:func:`sized`, :func:`elastic_sizes`)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any


from moetrain.config.schema import ConfigError, MoEConfig, ModelConfig, RunConfig

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
