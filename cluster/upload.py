"""What a submitted job uploads: an allow-list of the working directory, packed by us.

Owns: the decision, file by file, of what goes into a Ray job's ``working_dir`` package, and the
package itself (:func:`write_package`). The candidates are
- in a git checkout: the files git would consider (``git ls-files -co --exclude-standard``:
  tracked, plus untracked ones ``.gitignore`` does not ignore);
- elsewhere: every file under the folder (symbolic links are not followed).
Then name rules drop, whatever git says (case-insensitive, on every component of the path):
- secrets: ``.env`` files, cloud, SSH and database credentials, keys and certificates, tokens,
  shell histories, Terraform state, kubeconfigs;
- data and checkpoints: tensor, array and archive files, and any checkpoint folder (one holding
  ``step-<N>/manifest.json``);
- bulk: virtual environments, caches, ``.git``, run outputs.
``--include PATTERN`` (gitignore-style, matched against the path relative to the working directory)
re-admits what the name rules (or git) leave out: the user's choice, stated per path.

A symbolic link is never followed out of the working directory: a link goes (as a copy of its
target) only when its target is a file inside the folder that is itself uploaded. Ray packs the
zip we hand it byte for byte, so :attr:`UploadPlan.uploaded` (what ``moetrain submit`` prints) is
exactly the package's member list.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import stat
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

SECRETS = (
    ".env",
    ".env.*",
    "*.env",
    ".envrc",
    ".aws",
    ".ssh",
    ".gnupg",
    ".netrc",
    ".pypirc",
    ".npmrc",
    ".git-credentials",
    ".docker",
    ".dockercfg",
    ".kube",
    "kubeconfig",
    "kubeconfig.*",
    "*.kubeconfig",
    ".ray",
    "auth_token",
    ".azure",
    "gcloud",
    ".s3cfg",
    ".boto",
    ".pgpass",
    ".my.cnf",
    ".vault-token",
    ".htpasswd",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.ppk",
    "*.jks",
    "*.keystore",
    "*.kdbx",
    "*.gpg",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "credentials",
    "credentials.*",
    "*credentials*.json",
    "service-account*.json",
    "token.json",
    "tokens.json",
    "*.token",
    "secrets",
    "secrets.*",
    "secret.*",
    "*.secret",
    "*.secrets",
    "*.tfstate",
    "*.tfstate.*",
    "*.tfvars",
    ".terraform",
    "*_history",
    ".history",
)
DATA = (
    "*.pt",
    "*.pth",
    "*.safetensors",
    "*.ckpt",
    "*.bin",
    "*.parquet",
    "*.arrow",
    "*.npz",
    "*.npy",
    "*.tar",
    "*.tar.gz",
    "*.tgz",
    "*.zip",
    "*.h5",
    "*.jsonl.gz",
)
BULK = (
    ".venv",
    "venv",
    ".cache",
    ".git",
    "wandb",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    "runs",
    "node_modules",
    ".mypy_cache",
    ".ruff_cache",
)
RULES = (("secret", SECRETS), ("data", DATA), ("bulk", BULK))
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same files give the same package (Ray caches by hash)


@dataclass(frozen=True)
class UploadPlan:
    root: Path
    uploaded: tuple[str, ...]  # relative posix paths of files that go, sorted: the package's members
    sources: tuple[Path, ...]  # the file each member is read from (a link's target), same order
    excluded: tuple[tuple[str, str], ...] = field(default=())  # (relative path, reason): files or folders
    git: bool = False  # the candidates came from git

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for _, reason in self.excluded:
            counts[reason] = counts.get(reason, 0) + 1
        kept = ", ".join(f"{n} {r}" for r, n in sorted(counts.items())) or "nothing"
        how = "files git considers" if self.git else "files"
        return (
            f"uploading {len(self.uploaded)} file(s) ({how}) from {self.root}; left out: {kept} "
            "(--include to add; --dry-run lists them)"
        )


def _reason(name: str) -> str:
    low = name.lower()
    for reason, patterns in RULES:
        if any(fnmatch.fnmatchcase(low, p) for p in patterns):
            return reason
    return ""


def _is_checkpoint_dir(path: Path) -> bool:
    try:
        return any(c.is_dir() and c.name.startswith("step-") and (c / "manifest.json").exists() for c in path.iterdir())
    except OSError:
        return False


def _allowed(rel: str, include: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(rel, p.strip("/")) or fnmatch.fnmatch(rel, p.strip("/") + "/*") for p in include)


def _git_files(root: Path) -> list[str] | None:
    """What git considers under ``root`` (relative posix paths), or None when ``root`` is not in a
    git work tree (or git is missing)."""
    try:
        inside = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--is-inside-work-tree"], capture_output=True, text=True, timeout=60
        )
        if inside.returncode != 0 or inside.stdout.strip() != "true":
            return None
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard"],
            capture_output=True,
            timeout=300,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted({p for p in os.fsdecode(out).split("\0") if p})


def _walk(root: Path, include: tuple[str, ...], excluded: list[tuple[str, str]] | None) -> list[str]:
    """Every file and link under ``root`` without following links; folders the name rules drop are
    not entered (recorded in ``excluded`` when given) unless ``include`` reaches into them."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for d in sorted(dirnames):
            rel = (here / d).relative_to(root).as_posix()
            if (here / d).is_symlink():
                dirnames.remove(d)
                found.append(rel)  # judged as a link below
                continue
            reason = _reason(d) or ("checkpoint" if _is_checkpoint_dir(here / d) else "")
            if reason and not _allowed(rel, include) and not any(i.strip("/").startswith(rel + "/") for i in include):
                if excluded is not None:
                    excluded.append((rel, reason))
                dirnames.remove(d)
        found.extend((here / f).relative_to(root).as_posix() for f in sorted(filenames))
    return found


def _rule(root: Path, rel: str, checkpoint_dirs: dict[str, bool]) -> str:
    """The name rule that drops ``rel`` (a component's name, or a checkpoint folder above it), or ""."""
    parts = rel.split("/")
    for i, part in enumerate(parts):
        reason = _reason(part)
        if reason:
            return reason
        if i < len(parts) - 1:
            d = "/".join(parts[: i + 1])
            if d not in checkpoint_dirs:
                checkpoint_dirs[d] = _is_checkpoint_dir(root / d)
            if checkpoint_dirs[d]:
                return "checkpoint"
    return ""


def upload_plan(root: str | os.PathLike, include: tuple[str, ...] | list[str] = ()) -> UploadPlan:
    """Decide what a job upload of ``root`` takes (see the module doc)."""
    root = Path(root).resolve()
    include = tuple(include)
    excluded: list[tuple[str, str]] = []
    git = _git_files(root)
    if git is None:
        candidates = _walk(root, include, excluded)
    else:
        candidates = git
        if include:  # the allow-list also reaches what git ignores
            known = set(git)
            extra = {r for r in _walk(root, include, None) if r not in known and _allowed(r, include)}
            candidates = sorted(known | extra)
    checkpoint_dirs: dict[str, bool] = {}
    files: dict[str, Path] = {}
    links: list[str] = []
    for rel in candidates:
        if rel.endswith("/"):
            excluded.append((rel.rstrip("/"), "nested repository"))
            continue
        path = root / rel
        reason = "" if _allowed(rel, include) else _rule(root, rel, checkpoint_dirs)
        if reason:
            excluded.append((rel, reason))
        elif path.is_symlink():
            links.append(rel)
        elif path.is_file():
            files[rel] = path
        elif path.exists():
            excluded.append((rel, "not a regular file"))
    for rel in links:  # after the files: a link goes only if its target goes too
        target = Path(os.path.realpath(root / rel))
        try:
            target_rel = target.relative_to(root).as_posix()
        except ValueError:
            excluded.append((rel, "link out of the folder"))
            continue
        if target_rel in files:
            files[rel] = target
        else:
            excluded.append((rel, "link to a path not uploaded"))
    names = tuple(sorted(files))
    return UploadPlan(root, names, tuple(files[n] for n in names), tuple(excluded), git=git is not None)


def write_package(plan: UploadPlan, path: str | os.PathLike) -> Path:
    """Write the plan's files into the zip at ``path`` (members = ``plan.uploaded``, fixed times,
    file modes kept). A file that turned into a link out of the folder since the plan is refused."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel, src in zip(plan.uploaded, plan.sources):
            real = Path(os.path.realpath(src))
            if real != src or plan.root not in real.parents:
                raise RuntimeError(f"{rel} changed into a link out of {plan.root} while packing")
            info = zipfile.ZipInfo(rel, date_time=ZIP_DATE)
            info.external_attr = (stat.S_IFREG | (os.stat(real).st_mode & 0o777)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(real, "rb") as f, zf.open(info, "w") as out:
                shutil.copyfileobj(f, out, 1 << 20)
    return path
