"""The run's configuration tree: the nested, keyword-only dataclasses that describe a run (model,
moe, data, train, checkpoint, storage, cluster, placement, logging), and :class:`ConfigError`.
Building them is :mod:`moetrain.config.build`, checking them :mod:`moetrain.config.checks`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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


# --------------------------------------------------------------------------------------------
