"""What checkpoints a run has, which to keep, and removing the rest.

Owns: listing (one recursive listing per call: committed or not, size, object count),
retention (keep the newest ``keep`` committed checkpoints by step, never the newest committed
one nor the one ``latest`` names), garbage collection of uncommitted ``step-N/`` directories
*older* than the newest commit (newer ones may still be in flight and are left alone), stray
``*.tmp-*`` objects inside kept checkpoints, and aborting stale S3 multipart uploads.

Objects are written straight to their final keys (``storage.write_direct``), so a failed
checkpoint can leave a *partial* object inside its ``step-N/``. Such a step has no manifest
(a failed rank is never committed): it is garbage like any uncommitted step, and readers would
reject the object anyway (checksum against the manifest).

Deleting a committed checkpoint removes its ``manifest.json`` first, so a deletion cut short
leaves an uncommitted directory (garbage for the next clean), never a committed-but-broken one.

Multipart uploads: a writer killed mid-object leaves a *pending multipart upload* on S3 (not a
visible object; billed storage until aborted). pyarrow does not expose ListMultipartUploads /
AbortMultipartUpload, so :func:`abort_stale_uploads` uses boto3 when it is importable (it only
touches uploads of keys inside the run's ``step-N/`` directories, i.e. objects we write directly
and our ``*.tmp-*`` keys, older than a cutoff); without boto3 it says so. A bucket
lifecycle rule ``AbortIncompleteMultipartUpload`` (e.g. after 1 day) covers it server-side.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.layout import MANIFEST, check_run, parse_step_dir, step_prefix
from moetrain.checkpoint.manifest import read_latest
from moetrain.storage.store import TMP_MARK, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointInfo:
    run: str
    step: int
    committed: bool  # has a manifest.json
    size: int  # bytes of all objects (temporary ones excluded)
    objects: int  # stored objects, manifest excluded
    tmp_objects: int  # *.tmp-* leftovers
    uri: str


@dataclass(frozen=True)
class CleanReport:
    kept: tuple[int, ...] = ()  # committed steps kept
    deleted: tuple[int, ...] = ()  # committed steps removed by retention
    garbage: tuple[int, ...] = ()  # uncommitted steps removed
    tmp_deleted: tuple[str, ...] = ()  # keys of stray temporary objects removed
    aborted_uploads: tuple[str, ...] = ()  # keys of pending multipart uploads aborted
    notes: tuple[str, ...] = ()


def list_checkpoints(store: Store, run: str | None = None) -> list[CheckpointInfo]:
    """Every ``step-N/`` of ``run`` (or of every run under the root), sorted by (run, step)."""
    groups: dict[tuple[str, int], list] = {}
    for f in store.list_files(check_run(run) if run else ""):
        parts = f.key.split("/", 2)
        step = parse_step_dir(parts[1]) if len(parts) == 3 else None
        if step is not None:
            groups.setdefault((parts[0], step), []).append((parts[2], f.size))
    out = []
    for (r, step), files in sorted(groups.items()):
        tmp = [n for n, _ in files if TMP_MARK in n]
        objs = [(n, s) for n, s in files if TMP_MARK not in n and n != MANIFEST]
        out.append(
            CheckpointInfo(
                run=r,
                step=step,
                committed=any(n == MANIFEST for n, _ in files),
                size=sum(s for _, s in objs),
                objects=len(objs),
                tmp_objects=len(tmp),
                uri=store.uri_of(step_prefix(r, step)),
            )
        )
    return out


def plan_retention(
    infos: list[CheckpointInfo], keep: int | None, latest: int | None
) -> tuple[list[int], list[int], list[int]]:
    """(kept committed, committed to delete, uncommitted to delete) steps of one run.

    ``keep=None`` keeps every committed checkpoint. Pure: no I/O."""
    if keep is not None and keep < 1:
        raise CheckpointError(f"checkpoint.keep ({keep}) must be >= 1")
    committed = sorted(i.step for i in infos if i.committed)
    if not committed:
        return [], [], []
    protected = set(committed if keep is None else committed[-keep:])
    if latest in committed:
        protected.add(latest)
    newest = committed[-1]
    garbage = sorted(i.step for i in infos if not i.committed and i.step < newest)
    return sorted(protected), [s for s in committed if s not in protected], garbage


def _latest_or_none(store: Store, run: str) -> int | None:
    try:
        return read_latest(store, run)
    except CheckpointError as exc:  # a corrupt pointer must not block cleaning
        log.warning("ignoring the latest pointer of %s: %s", run, exc)
        return None


def apply_retention(store: Store, run: str, keep: int | None) -> CleanReport:
    """Delete what :func:`plan_retention` says, plus stray temporary objects of kept steps."""
    infos = list_checkpoints(store, run)
    kept, drop, garbage = plan_retention(infos, keep, _latest_or_none(store, run))
    for step in drop:
        prefix = step_prefix(run, step)
        store.delete(f"{prefix}/{MANIFEST}")  # uncommit first
        store.delete_prefix(prefix)
    for step in garbage:
        store.delete_prefix(step_prefix(run, step))
    tmp_deleted = []
    for info in infos:
        if info.step in kept and info.tmp_objects:
            for f in store.list_files(step_prefix(run, info.step)):
                if TMP_MARK in f.key:
                    store.delete(f.key)
                    tmp_deleted.append(f.key)
    return CleanReport(kept=tuple(kept), deleted=tuple(drop), garbage=tuple(garbage), tmp_deleted=tuple(tmp_deleted))


def abort_stale_uploads(store: Store, run: str, older_than_s: float = 3600.0) -> tuple[list[str], str]:
    """Abort pending S3 multipart uploads of keys inside ``run``'s ``step-N/`` directories (what
    our writers upload: objects direct, commit records via ``*.tmp-*``) older than
    ``older_than_s``. Aborting never touches a completed object. Returns (aborted keys, note);
    the note says why nothing could be done."""
    if store.kind != "s3":
        return [], ""
    try:
        import boto3  # optional: pyarrow has no API for multipart uploads
    except ImportError:
        return [], (
            "boto3 is not installed: pending multipart uploads were not checked "
            "(use a bucket lifecycle rule AbortIncompleteMultipartUpload)"
        )
    bucket, _, base = store.root.partition("/")
    prefix = f"{base}/{check_run(run)}/" if base else f"{run}/"
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than_s)
    aborted = []
    try:
        client = boto3.client("s3", endpoint_url=store.endpoint or None, region_name=store.s3_region or None)
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            for up in page.get("Uploads", []):
                rest = up["Key"][len(prefix) :].split("/", 1)
                ours = len(rest) == 2 and parse_step_dir(rest[0]) is not None
                if ours and up["Initiated"] <= cutoff:
                    client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                    aborted.append(up["Key"])
    except Exception as exc:  # botocore errors: report them typed, naming the store
        raise CheckpointError(f"aborting multipart uploads under {store.uri_of(run)} failed: {exc}") from exc
    return aborted, ""


def clean(store: Store, run: str, keep: int | None = None, *, uploads_older_than_s: float = 3600.0) -> CleanReport:
    """Garbage-collect ``run``: uncommitted leftovers, stray temporary objects, stale multipart
    uploads, and (with ``keep``) committed checkpoints beyond the newest ``keep``."""
    report = apply_retention(store, run, keep)
    aborted, note = abort_stale_uploads(store, run, uploads_older_than_s)
    return CleanReport(
        kept=report.kept,
        deleted=report.deleted,
        garbage=report.garbage,
        tmp_deleted=report.tmp_deleted,
        aborted_uploads=tuple(aborted),
        notes=(note,) if note else (),
    )
