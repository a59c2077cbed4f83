"""The ``moetrain`` command line: ``train``, ``ckpt``, ``submit``.

    moetrain train [--config FILE|tiny|small] [--set a.b=c ...] [--resume URI|latest]
    moetrain plan [--config FILE|NAME] [--set a.b=c ...] [--memory-gb G]
    moetrain prepare [DOMAIN=]PATH|URI|GLOB ... --out URI [--tokenizer bpe|hf:DIR] [--seq-len N]
    moetrain ckpt list|verify|inspect|clean|unlock URI
    moetrain submit --address http://HEAD:8265 [--dry-run] [--include PATTERN] -- [train arguments]
    moetrain hf import HF_DIR OUT [--run NAME]      (HF model dir -> OUT/NAME/step-0)
    moetrain hf export CKPT OUT [--arch A] [--dtype auto|fp32|bf16] [--max-shard-size 5GB] [--tokenizer DIR]
    moetrain generate CKPT --prompt TEXT [--max-new-tokens N] [--ids]

User errors (bad config, data, checkpoint, store) print one clear line and exit non-zero.
"""

from __future__ import annotations

import argparse
import logging
import sys

# Exit statuses of `moetrain train`: 0 finished every step; 1 failed; 2 bad input (config, data,
# checkpoint store) refused before training; 3 stopped early on request (SIGINT/SIGTERM, ray job stop).
EXIT_FAILED, EXIT_USER_ERROR, EXIT_STOPPED = 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moetrain", description="Distributed MoE training on Ray.")
    sub = p.add_subparsers(dest="command")
    _train_parser(sub)
    _plan_parser(sub)
    _ckpt_parser(sub)
    _prepare_parser(sub)
    _submit_parser(sub)
    _hf_parsers(sub)
    return p


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model (embedded local Ray, or RAY_ADDRESS)")
    t.add_argument("--config", default=None, help="YAML file, or a shipped config name (tiny, small)")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set cluster.num_workers=4 (repeatable)",
    )
    t.add_argument("--resume", default=None, help="checkpoint URI or 'latest' (sets checkpoint.resume)")


def _plan_parser(sub) -> None:
    pl = sub.add_parser("plan", help="per-rank memory of a config, whether it fits, and what would make it fit")
    pl.add_argument("--config", default=None, help="YAML file, or a shipped config name (e.g. olmoe-1b-7b)")
    pl.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable)",
    )
    pl.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        metavar="G",
        help="memory per rank in GiB (default: the connected Ray cluster's memory resource when "
        "cluster.address / RAY_ADDRESS is set, else this machine's memory, over the actors)",
    )


def _ckpt_parser(sub) -> None:
    c = sub.add_parser("ckpt", help="list, verify, inspect or clean checkpoints; unlock a dead run's name")
    c.add_argument("action", choices=["list", "verify", "inspect", "clean", "unlock"])
    c.add_argument("uri", help="checkpoint root (list) or a step-<N> / run URI")
    c.add_argument(
        "--keep", type=int, default=None, help="clean: also delete committed checkpoints beyond the newest N"
    )
    _store_flags(c)


def _submit_parser(sub) -> None:
    s = sub.add_parser("submit", help="submit `moetrain train ...` as a Ray job")
    s.add_argument("--address", default=None, help="Ray dashboard address (else RAY_ADDRESS)")
    s.add_argument("--no-wait", action="store_true", help="return after submitting")
    s.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="upload a path the default rules leave out (secrets, data, checkpoints); repeatable",
    )
    s.add_argument("--dry-run", action="store_true", help="print the files the job would upload; submit nothing")
    s.add_argument(
        "--connect-timeout-s",
        type=float,
        default=30.0,
        metavar="S",
        help="give up reaching the dashboard address after S seconds (default 30)",
    )
    s.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="Ray auth token of a cluster with token auth (else RAY_AUTH_TOKEN)",
    )
    s.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments after -- go to moetrain train")


def _store_flags(parser) -> None:
    """The object-store flags of every command that opens a store (ckpt, hf, generate, prepare):
    the same fields as the run config's ``storage`` section (see :func:`_store_cfg`)."""
    parser.add_argument(
        "--s3-endpoint", default="", help="S3 endpoint URL (storage.s3_endpoint; else AWS_ENDPOINT_URL)"
    )
    parser.add_argument("--s3-region", default="", help="S3 region (storage.s3_region; else AWS_REGION)")
    parser.add_argument(
        "--gcs-endpoint", default="", help="GCS endpoint URL (storage.gcs_endpoint; else STORAGE_EMULATOR_HOST)"
    )


def _store_cfg(args):
    """The :class:`~moetrain.config.StoreConfig` of the ``--s3-endpoint`` / ``--s3-region`` /
    ``--gcs-endpoint`` flags (an endpoint holding credentials is refused when the store opens)."""
    from moetrain.config import StoreConfig

    return StoreConfig(s3_endpoint=args.s3_endpoint, s3_region=args.s3_region, gcs_endpoint=args.gcs_endpoint)


def _hf_parsers(sub) -> None:
    h = sub.add_parser("hf", help="import a Hugging Face model as a checkpoint, or export one")
    h.add_argument("action", choices=["import", "export"])
    h.add_argument("src", help="import: HF model directory or URI; export: checkpoint (step or run) URI")
    h.add_argument("out", help="import: checkpoint root; export: output directory or URI")
    h.add_argument("--run", default="hf", help="import: run name of the checkpoint (default hf)")
    h.add_argument("--arch", default="", help="export: model_type (default: the one it was imported from)")
    h.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="export: tensor dtype (auto = the source model's, as recorded at import)",
    )
    h.add_argument(
        "--max-shard-size",
        default="",
        help="export: largest shard, e.g. 5GB or 500MB (default: as many shards as the source)",
    )
    h.add_argument("--tokenizer", default="", help="export: copy the tokenizer files from this HF directory")
    _store_flags(h)
    g = sub.add_parser("generate", help="greedy generation from a checkpoint (one process)")
    g.add_argument("ckpt", help="checkpoint (step or run) URI")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--tokenizer", default="", help="HF directory whose tokenizer.json to use")
    g.add_argument("--ids", action="store_true", help="print the new token ids, not the text")
    _store_flags(g)


def _hf(args) -> int:
    from moetrain.hf import export_hf, import_hf
    from moetrain.hf.export import parse_size

    store = _store_cfg(args)
    if args.action == "import":
        report = import_hf(args.src, args.out, args.run, store_cfg=store)
    else:
        shard = parse_size(args.max_shard_size) if args.max_shard_size else 0
        report = export_hf(
            args.src,
            args.out,
            arch=args.arch,
            dtype=args.dtype,
            max_shard_bytes=shard,
            tokenizer_dir=args.tokenizer,
            store_cfg=store,
        )
    print(f"{report.uri}: {report.tensors} tensors, {report.bytes / 1e6:.1f} MB, {report.files} files; {report.note}")
    return 0


def _generate(args) -> int:
    from moetrain.hf.generate import generate

    out = generate(
        args.ckpt, args.prompt, args.max_new_tokens, tokenizer_dir=args.tokenizer, store_cfg=_store_cfg(args)
    )
    print(" ".join(str(i) for i in out.new_ids) if args.ids else out.text)
    return 0


def _prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize and pack a corpus into token shards (Ray Data)")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="[DOMAIN=]INPUT",
        help="a file, directory or glob; local, s3:// or gs:// (.parquet, .jsonl, else plain text)",
    )
    p.add_argument("--out", required=True, help="output URI: local path, s3://bucket/prefix or gs://bucket/prefix")
    p.add_argument("--text-column", default="text", help="Parquet column / JSONL field holding the text")
    p.add_argument("--domain-column", default="", help="Parquet column / JSONL field holding each row's domain")
    p.add_argument(
        "--domain-pattern", default="", help="regex whose first group, found in a file's path, is its domain"
    )
    p.add_argument(
        "--tokenizer", default="bpe", help="bpe (byte-level BPE trained on a sample) or hf:DIR (DIR/tokenizer.json)"
    )
    p.add_argument("--vocab-size", type=int, default=2048, help="bpe vocabulary size")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training row (rows hold seq_len + 1)")
    p.add_argument(
        "--batch-docs", type=int, default=None, help="Parquet rows per batch (one shard per batch and domain)"
    )
    _store_flags(p)
    p.add_argument(
        "--num-cpus", type=int, default=0, help="CPUs of the embedded local Ray (0 = all; ignored with RAY_ADDRESS)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print only the summary as one JSON line")


def _prepare(args) -> int:
    import json
    import os

    import ray

    from cluster.prepare import BATCH_DOCS, PrepareOptions, prepare

    opts = PrepareOptions(
        inputs=tuple(args.inputs),
        out=args.out,
        text_column=args.text_column,
        domain_column=args.domain_column,
        domain_pattern=args.domain_pattern,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        batch_docs=args.batch_docs or BATCH_DOCS,
        progress=not args.no_progress,
        store=_store_cfg(args),
    )

    def connect() -> None:  # after the inputs are checked: bad input fails in seconds
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS") or None  # else a new local Ray, never one found here
            ray.init(
                address=address or "local",
                num_cpus=None if address else (args.num_cpus or os.cpu_count()),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )

    summary = prepare(opts, connect).summary()
    if not args.json:
        print(
            f"prepared {summary['rows']:,} rows in {summary['shards']} shards ({summary['written']} written, "
            f"{summary['skipped']} already there) at {summary['uri']} in {summary['seconds']:.1f} s "
            f"({summary['rows_per_s']:,.0f} rows/s); tokens per domain: {summary['tokens_per_domain']}"
        )
    print(json.dumps(summary))
    return 0


def _train(args) -> int:
    from cluster.stop import StopGuard, StopRequested  # before the heavy imports: a stop is never exit 143

    with StopGuard.install(until_exit=True):
        try:
            return _train_run(args)
        except StopRequested as exc:  # before the run began (importing, reading the config): no summary yet
            print(f"moetrain: {exc} before the run started", file=sys.stderr)
            return EXIT_STOPPED


def _train_run(args) -> int:
    from cluster.api import run
    from moetrain.config import load_config

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    result = run(cfg, raise_on_failure=False)
    if result.state.value == "stopped":
        resume = "; resume with --resume latest" if result.summary.get("checkpoints_committed") else ""
        print(
            f"moetrain: run {cfg.cluster.run_name} STOPPED at step {result.summary.get('steps')} of "
            f"{cfg.train.steps} ({result.error or 'a stop was requested'}){resume}",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    if result.user_error:  # the cluster cannot hold the group: refused before training
        print(f"moetrain: error: {result.error}", file=sys.stderr)
        return EXIT_USER_ERROR
    if result.state.value != "finished":
        print(f"moetrain: run {cfg.cluster.run_name} failed:\n{result.error}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _plan(args) -> int:
    """``moetrain plan``: print the memory plan; exit 0 when it fits (or memory is unknown), 1 when not."""
    import os

    from moetrain.config import ConfigError, load_config
    from moetrain.hf.load import context_of_run, resolve_init_from
    from moetrain.plan import GIB, format_plan, plan_memory

    cfg = resolve_init_from(load_config(args.config, list(args.overrides)))  # an HF model's shape and context
    if args.memory_gb is not None:
        if not args.memory_gb > 0:
            raise ConfigError(f"--memory-gb ({args.memory_gb}) must be > 0")
        available: int | None = int(args.memory_gb * GIB)
        source = "--memory-gb"
    elif cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        import ray

        from cluster.api import ensure_ray
        from cluster.memory import ray_memory_per_rank

        ensure_ray(cfg)
        available, source = ray_memory_per_rank(cfg)
        ray.shutdown()
    else:
        from cluster.memory import local_memory_per_rank

        available, source = local_memory_per_rank(cfg)
    plan = plan_memory(cfg, available_bytes=available, source=source)
    print(f"moetrain plan: {args.config or 'tiny'}")
    print(format_plan(plan, cfg))
    print(context_of_run(cfg))
    return 1 if plan.fits is False else 0


def _ckpt(args) -> int:
    """``moetrain ckpt list|verify|inspect URI``: exit 1 when verify finds a problem."""
    from moetrain.checkpoint import cli

    cfg = _store_cfg(args)
    if args.action == "list":
        _, text = cli.ckpt_list(args.uri, cfg)
    elif args.action == "verify":
        report, text = cli.ckpt_verify(args.uri, cfg)
        print(text)
        return 0 if report.ok else 1
    elif args.action == "clean":
        _, text = cli.ckpt_clean(args.uri, cfg, keep=args.keep)
    elif args.action == "unlock":  # the run holding the name is known dead: free it now
        _, text = cli.ckpt_unlock(args.uri, cfg)
    else:
        _, text = cli.ckpt_inspect(args.uri, cfg)
    print(text)
    return 0


def _submit(args) -> int:
    from cluster.submit import submit

    from moetrain.config import ConfigError

    if not args.connect_timeout_s > 0:
        raise ConfigError(f"--connect-timeout-s ({args.connect_timeout_s}) must be > 0")
    return submit(
        args.train_args,
        address=args.address,
        wait=not args.no_wait,
        include=args.include,
        dry_run=args.dry_run,
        connect_timeout_s=args.connect_timeout_s,
        token_file=args.token_file,
    )


def main(argv: list[str] | None = None) -> int:
    from moetrain.config import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = _parser().parse_args(argv)
    if args.command is None:
        args = _parser().parse_args(["train"] + list(argv or sys.argv[1:]))
    user_errors: tuple = (ConfigError,)
    try:
        from moetrain.data import DataError

        user_errors += (DataError,)
    except ImportError:
        pass
    try:
        from moetrain.checkpoint import CheckpointError

        user_errors += (CheckpointError,)
    except ImportError:
        pass
    try:
        from placement.placement import PlacementError

        user_errors += (PlacementError,)
        if args.command == "train":
            return _train(args)
        if args.command == "ckpt":
            return _ckpt(args)
        if args.command == "hf":
            return _hf(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "prepare":
            return _prepare(args)
        return _submit(args)
    except user_errors as exc:
        print(f"moetrain: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
