"""What a submitted job uploads: the working directory minus secrets, data and bulk.

Owns: the decision, file by file, of what goes into a Ray job's ``working_dir`` package. Ray
already skips what ``.gitignore`` ignores; this adds the rest of what must never leave the
machine by accident, whether ignored or not:
- secrets: ``.env`` files, cloud and SSH credentials, keys and certificates, tokens;
- data and checkpoints: tensor, array and archive files, and any checkpoint folder (one holding
  ``step-<N>/manifest.json``);
- bulk: virtual environments, caches, ``.git``, run outputs.
An explicit allow-list (``--include PATTERN``, gitignore-style, matched against the path relative to
the working directory) re-admits what the rules would drop: the user's choice, stated per path.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

SECRETS = (".env", ".env.*", "*.env", ".envrc", ".aws", ".ssh", ".gnupg", ".netrc", ".pypirc", ".npmrc",
           ".git-credentials", ".docker", ".kube", ".ray", "auth_token", "*.pem", "*.key", "*.p12", "*.pfx",
           "id_rsa*", "id_ecdsa*", "id_ed25519*", "credentials", "credentials.*", "*credentials*.json",
           "service-account*.json", "*.keystore", "secrets", "secrets.*")
DATA = ("*.pt", "*.pth", "*.safetensors", "*.ckpt", "*.bin", "*.parquet", "*.arrow", "*.npz", "*.npy",
        "*.tar", "*.tar.gz", "*.tgz", "*.zip", "*.h5", "*.jsonl.gz")
BULK = (".venv", "venv", ".cache", ".git", "wandb", "*.egg-info", "__pycache__", ".pytest_cache", "runs",
        "node_modules", ".mypy_cache", ".ruff_cache")
RULES = (("secret", SECRETS), ("data", DATA), ("bulk", BULK))


@dataclass(frozen=True)
class UploadPlan:
    root: Path
    uploaded: tuple[str, ...]  # relative posix paths of files that go
    excluded: tuple[tuple[str, str], ...] = field(default=())  # (relative path, reason): files or folders

    def ray_excludes(self) -> list[str]:
        """Anchored gitignore-style patterns for Ray's runtime_env ``excludes``."""
        return ["/" + path for path, _ in self.excluded]

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for _, reason in self.excluded:
            counts[reason] = counts.get(reason, 0) + 1
        kept = ", ".join(f"{n} {r}" for r, n in sorted(counts.items())) or "nothing"
        return f"uploading {len(self.uploaded)} file(s) from {self.root}; left out: {kept} (--include to add)"


def _reason(name: str) -> str:
    for reason, patterns in RULES:
        if any(fnmatch.fnmatch(name, p) for p in patterns):
            return reason
    return ""


def _is_checkpoint_dir(path: Path) -> bool:
    try:
        return any(c.is_dir() and c.name.startswith("step-") and (c / "manifest.json").exists()
                   for c in path.iterdir())
    except OSError:
        return False


def _allowed(rel: str, include: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(rel, p.strip("/")) or fnmatch.fnmatch(rel, p.strip("/") + "/*") for p in include)


def upload_plan(root: str | os.PathLike, include: tuple[str, ...] | list[str] = ()) -> UploadPlan:
    """Walk ``root`` and decide what a job upload takes (see the module doc)."""
    root = Path(root).resolve()
    include = tuple(include)
    uploaded: list[str] = []
    excluded: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for d in sorted(dirnames):
            rel = (here / d).relative_to(root).as_posix()
            reason = _reason(d) or ("checkpoint" if _is_checkpoint_dir(here / d) else "")
            if reason and not _allowed(rel, include) and not any(i.startswith(rel + "/") for i in include):
                excluded.append((rel, reason))
                dirnames.remove(d)
        for f in sorted(filenames):
            rel = (here / f).relative_to(root).as_posix()
            reason = _reason(f)
            if reason and not _allowed(rel, include):
                excluded.append((rel, reason))
            else:
                uploaded.append(rel)
    return UploadPlan(root, tuple(sorted(uploaded)), tuple(excluded))
