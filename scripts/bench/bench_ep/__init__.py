"""Benchmark of moetrain's expert parallelism against DeepSpeed-MoE, on CPU with gloo.

Usage (DeepSpeed is the ``bench`` extra: ``pip install -e .[bench]``; ``.[test]`` has it too)::

    python scripts/bench/bench_ep --quick          # from any directory
    python -m scripts.bench.bench_ep --quick       # the same, from the repository root
    python scripts/bench/bench_ep --no-deepspeed   # moetrain only, without DeepSpeed installed

Every figure is measured in the same run as its baseline, with the variants interleaved step by
step (other processes may be loading the CPU), and reported as medians and ratios:

1. layer: training-step tokens/s of one MoE layer (router + dispatch + experts + combine,
   forward + backward + AdamW step) — moetrain ``MoELayer`` + ``AllToAllDispatcher`` with the
   capacity factor DeepSpeed uses, moetrain dropless, and ``deepspeed.moe.layer.MoE`` with the
   same SwiGLU experts (weights copied), gate weights, top-k, capacity factor and world size, with
   token dropping and without (``drop_tokens=False`` pads every expert to the largest count).
   DeepSpeed's Gumbel noise on the 2nd expert and its noisy gate are off, so both route the same.
2. model: the whole moetrain ``Transformer`` vs the same Transformer (same weights) whose MoE
   FFNs are DeepSpeed ``MoE`` layers (``DSMoEAdapter``); LM loss, dense-gradient all-reduce,
   AdamW step.
3. expert compute: ``GroupedExperts`` forward + backward on a dispatched batch (uneven rows per
   slot from a random router) vs one [N, D] x [D, F] SwiGLU matmul chain with the same FLOPs.
4. all-to-all bytes per step, with and without dedup, counted from the dispatcher's
   ``send_splits`` (off-rank units only), and the measured step time of each, for a *random*
   routing (top-k of uniform random scores) and a *correlated* one (with probability
   ``--corr`` a token picks an adjacent expert pair (2j, 2j+1), which the contiguous placement
   puts on one rank; else two random experts).
5. memory: expert parameter bytes per rank for world sizes 1, 2, 4 (a Transformer built for each
   placement) and the peak RSS of processes that train it for two steps.

6. routing skew x capacity factor (layer and whole model): for each ``--skews`` target (0 =
   balanced) the layer's inputs get x + c*u and gate row e gets s*z[e]*u (model: u = direction of
   each layer's mean MoE input), s bisected until the *measured* global expert load max/mean hits
   the target (real traces: 1.36-1.60 Qwen1.5-MoE, 5.08 OLMoE layer 0). Both systems get the same
   inputs and gate weights, hence choose the same experts (checked: dropless == no-drop outputs).
   Compared: moetrain dropless vs DeepSpeed ``drop_tokens=False`` (pads every expert to the
   largest per-rank count) and moetrain vs DeepSpeed at each capacity factor (DeepSpeed computes
   E*C rows per rank; moetrain only the kept rows; both keep min(count, C) per expert).
   Headline: skew ``--headline-skew`` (1.5), the largest world, whole model, dropless vs no-drop.

7. issue 14: a torch.profiler top-ops table of one step of every layer and model variant
   (``--no-profile`` skips it); ``mt_chunked``, the dropless layer with its all-to-all pipelined
   over ``--chunks`` token blocks, and ``overlap_hidden_comm_share`` (how much of the unchunked
   layer's all-to-all wait the pipeline removes, ``layer.summarize_overlap``); the whole model's
   useful FLOP rate over a matmul rate timed in the same rounds; the keys of issue 14's target
   table at the top level of the JSON and, with target / met / rounds, under ``issue14``
   (docs/ep_performance.md). Every variant uses the same AdamW (``--adamw``, default fused).

8. precision (``--precision fp32|bf16|fp32,bf16``): every layer and model variant trains in that
   precision; bf16 = moetrain's mixed precision (autocast around the forward, fp32 master
   weights, router and losses in fp32) for both systems (``ds_baseline.DSMixedPrecision``).
   A second pass (bf16 after fp32) puts its sections under ``precision.bf16`` and its issue-14
   values at the top level as ``<key>_bf16``; the dedup study runs in the first pass only.

Prints a table, then ONE JSON line with every figure (``speedup_vs_deepspeed``, ``target_met``,
``headline``, ``balanced_parity_paired``, ``issue14`` and its keys). ``--quick`` is a ~1 minute version.
Each rank is one process with one intra-op thread (gloo, 127.0.0.1). No CUDA here: a GPU/NCCL
column is added only when ``torch.cuda.is_available()`` and ``torch.cuda.device_count() >= W``.

Modules: ``layer`` (1), ``model`` (2), ``experts`` (3), ``dedup`` (4), ``memory`` (5), ``skew`` (6,
and the calibration the layer and model studies share), ``report`` (headline and tables),
``worker`` (process groups), ``ds_baseline`` (the only importer of deepspeed), ``adapter`` (the
only uses of moetrain's training internals), ``common``, ``profiling`` and ``cli``.
"""
