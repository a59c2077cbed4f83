"""``moetrain ckpt list|verify|inspect|clean|unlock URI``: plain functions returning (data, text).

Each command returns its data (for scripts and tests) and a printable table (for people); the
argument parsing lives in the project CLI. ``URI`` may be a checkpoint root (every run), a run
directory (``<root>/<run>``) or one checkpoint (``<root>/<run>/step-<N>``; ``verify`` and
``inspect`` take a run directory to mean its newest commit). Stores are opened with the given
:class:`~moetrain.config.StoreConfig` (the CLI's ``--s3-endpoint`` / ``--s3-region`` /
``--gcs-endpoint``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from moetrain.checkpoint.errors import InvalidNameError
from moetrain.checkpoint.layout import CheckpointRef, parse_step_dir
from moetrain.checkpoint.lease import LeaseRecord, unlock
from moetrain.checkpoint.manifest import Manifest, read_manifest
from moetrain.checkpoint.reader import VerifyReport, resolve, split_uri, verify
from moetrain.checkpoint.retention import CheckpointInfo, CleanReport, clean, list_checkpoints
from moetrain.checkpoint.root import open_root
from moetrain.config import StoreConfig


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Left-aligned text columns separated by two spaces."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _absolute(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def ckpt_list(uri: str, store_cfg: StoreConfig | None = None) -> tuple[list[CheckpointInfo], str]:
    """Checkpoints under a root, a run directory or one checkpoint URI."""
    uri = _absolute(uri)
    store = open_root(uri, None, store_cfg)
    if any(parse_step_dir(name) is not None for name in store.list_dir("")):  # a run directory
        root, run, _ = split_uri(uri)
        infos = list_checkpoints(open_root(root, None, store_cfg), run)
    elif parse_step_dir(uri.rstrip("/").rsplit("/", 1)[-1]) is not None:  # one checkpoint
        root, run, step = split_uri(uri)
        infos = [i for i in list_checkpoints(open_root(root, None, store_cfg), run) if i.step == step]
    else:  # a root holding runs
        infos = list_checkpoints(store)
    rows = [
        (i.run, i.step, "yes" if i.committed else "NO", format_bytes(i.size), i.objects, i.tmp_objects, i.uri)
        for i in infos
    ]
    table = format_table(rows, ("run", "step", "committed", "size", "objects", "tmp", "uri"))
    return infos, table if infos else f"no checkpoints under {store.uri}"


def ckpt_verify(uri: str, store_cfg: StoreConfig | None = None, *, deep: bool = True) -> tuple[VerifyReport, str]:
    """Presence, size and checksum (crc32c / sha256, as the manifest says) of every object."""
    report = verify(resolve(uri, store_cfg=store_cfg), deep=deep)
    lines = [
        f"{report.uri}: {'OK' if report.ok else 'FAILED'} - {report.checked} objects, "
        f"{format_bytes(report.bytes_checked)} checked"
        + (f" ({', '.join(report.checksums) or 'no objects'})" if deep else " (sizes only)")
    ]
    lines += [f"  {p}" for p in report.problems]
    return report, "\n".join(lines)


def _summary(value: Any) -> str:
    if isinstance(value, dict):
        keys = ", ".join(map(str, list(value)[:6])) + (", ..." if len(value) > 6 else "")
        return f"{{{len(value)} keys: {keys}}}"
    if isinstance(value, list):
        tail = f" last={value[-1]!r}" if value and not isinstance(value[-1], (dict, list)) else ""
        return f"[{len(value)} items]{tail}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def inspect_manifest(ref: CheckpointRef, manifest: Manifest) -> dict[str, Any]:
    """Summary of a manifest: objects grouped by their first name segment, meta at a glance."""
    groups: dict[str, dict[str, int]] = {}
    for e in manifest.entries:
        g = groups.setdefault(e.name.split("/", 1)[0], {"objects": 0, "bytes": 0})
        g["objects"] += 1
        g["bytes"] += e.size
    return {
        "uri": ref.uri,
        "run": manifest.run,
        "step": manifest.step,
        "created": manifest.created,
        "world_size": manifest.world_size,
        "objects": len(manifest.entries),
        "total_bytes": manifest.total_bytes,
        "object_format": manifest.object_format,
        "checksums": list(manifest.checksums),
        "groups": groups,
        "meta": {k: _summary(v) for k, v in manifest.meta.items()},
    }


def ckpt_inspect(uri: str, store_cfg: StoreConfig | None = None) -> tuple[dict[str, Any], str]:
    """The manifest of one checkpoint, summarised."""
    ref = resolve(uri, store_cfg=store_cfg)
    info = inspect_manifest(ref, read_manifest(ref))
    rows = [
        ("checkpoint", info["uri"]),
        ("created", info["created"]),
        ("world size", info["world_size"]),
        ("format", info["object_format"]),
        ("checksum", ", ".join(info["checksums"]) or "-"),
        ("objects", f"{info['objects']} ({format_bytes(info['total_bytes'])})"),
    ]
    rows += [
        (f"  {g}/", f"{v['objects']} objects, {format_bytes(v['bytes'])}") for g, v in sorted(info["groups"].items())
    ]
    rows += [("meta", "")] + [(f"  {k}", v) for k, v in info["meta"].items()]
    return info, format_table(rows, ("field", "value"))


def ckpt_clean(uri: str, store_cfg: StoreConfig | None = None, *, keep: int | None = None) -> tuple[CleanReport, str]:
    """Remove uncommitted leftovers (and, with ``keep``, old commits) of a run directory."""
    root, run, step = split_uri(_absolute(uri))
    if step is not None:
        raise InvalidNameError(f"clean takes a run directory, not one checkpoint: {uri}")
    report = clean(open_root(root, None, store_cfg), run, keep)
    rows = [
        ("kept", list(report.kept)),
        ("deleted", list(report.deleted)),
        ("uncommitted removed", list(report.garbage)),
        ("temporary objects removed", len(report.tmp_deleted)),
        ("multipart uploads aborted", len(report.aborted_uploads)),
    ]
    rows += [("note", n) for n in report.notes]
    return report, format_table(rows, ("clean", run))


def ckpt_unlock(uri: str, store_cfg: StoreConfig | None = None) -> tuple[LeaseRecord | None, str]:
    """Remove the lease of a run directory (its writer is known to be dead: SIGKILL, lost node)."""
    root, run, step = split_uri(_absolute(uri))
    if step is not None:
        raise InvalidNameError(f"unlock takes a run directory, not one checkpoint: {uri}")
    store = open_root(root, None, store_cfg)
    rec = unlock(store, run)
    if rec is None:
        return None, f"{store.uri_of(run)}: no lease (nothing to unlock)"
    return rec, (
        f"{store.uri_of(run)}: removed the lease of host {rec.host} pid {rec.pid} "
        f"(last heartbeat {time.time() - rec.heartbeat:.0f} s ago)"
    )


COMMANDS = {
    "list": ckpt_list,
    "verify": ckpt_verify,
    "inspect": ckpt_inspect,
    "clean": ckpt_clean,
    "unlock": ckpt_unlock,
}
