"""What `moetrain submit` uploads: an allow-list (git's files, or the folder), minus secrets, data,
checkpoints and bulk, never through a link out of the folder; the printed list is the package.

The package is checked as Ray's job client sends it: ``upload_working_dir_if_needed`` (what
``JobSubmissionClient.submit_job`` calls) is given our runtime_env and reports the file it uploads.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cluster.submit import print_plan, runtime_env
from cluster.upload import upload_plan, write_package

REPO = Path(__file__).resolve().parents[2]


def _tree(root):
    files = {
        "train.py": "print(1)", "moetrain/model.py": "x = 1", "notes.md": "hi", "configs/my.yaml": "a: 1",
        ".env": "AWS_SECRET_ACCESS_KEY=abc", "configs/.env.prod": "TOKEN=1", ".aws/credentials": "[default]",
        "keys/server.pem": "-----BEGIN", "home/.ssh/id_rsa": "key", "gcp/service-account-prod.json": "{}",
        "data/shard-0.parquet": "PAR1", "weights/model.safetensors": "st",
        "ckpts/myrun/step-2/manifest.json": "{}", "ckpts/myrun/step-2/dense.pt": "pt", "ckpts/myrun/latest": "step-2",
        ".venv/bin/python": "", "runs/tiny/summary.json": "{}",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def _sent(tmp_path, plan) -> dict[str, bytes]:
    """The members and contents of the zip Ray's job client uploads for this plan."""
    from ray._private.runtime_env.packaging import get_uri_for_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    pkg = write_package(plan, tmp_path / f"pkg-{len(list(tmp_path.glob('pkg-*')))}.zip")
    uploads = []
    env = upload_working_dir_if_needed(runtime_env(pkg), include_gitignore=True,
                                       upload_fn=lambda path, excludes, is_file=False: uploads.append((path, is_file)))
    assert uploads == [(str(pkg), True)]  # sent as it is: Ray selects nothing itself
    assert env["working_dir"] == get_uri_for_package(pkg)
    with zipfile.ZipFile(pkg) as z:
        return {n: z.read(n) for n in z.namelist()}


def _printed(plan) -> list[str]:
    out = io.StringIO()
    print_plan(plan, out)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith(f"moetrain: uploading {len(lines) - 1} file(s)")
    return [line.strip() for line in lines[:-1]]


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_secrets_data_checkpoints_and_bulk_stay_home(tmp_path):
    root = tmp_path / "repo"
    _tree(root)
    plan = upload_plan(root)
    assert not plan.git
    assert set(plan.uploaded) == {"train.py", "moetrain/model.py", "notes.md", "configs/my.yaml"}
    reasons = dict(plan.excluded)
    assert reasons[".env"] == reasons["configs/.env.prod"] == reasons[".aws"] == "secret"
    assert reasons["keys/server.pem"] == reasons["home/.ssh"] == reasons["gcp/service-account-prod.json"] == "secret"
    assert reasons["data/shard-0.parquet"] == reasons["weights/model.safetensors"] == "data"
    assert reasons["ckpts/myrun"] == "checkpoint"
    assert "left out: 2 bulk, 1 checkpoint, 2 data, 6 secret" in plan.describe()
    sent = _sent(tmp_path, plan)
    assert sorted(sent) == _printed(plan) == list(plan.uploaded)
    assert sent["moetrain/model.py"] == b"x = 1"


def test_an_explicit_allow_list_re_admits_paths(tmp_path):
    root = tmp_path / "repo"
    _tree(root)
    plan = upload_plan(root, include=["data/*.parquet", "ckpts/myrun"])
    assert "data/shard-0.parquet" in plan.uploaded
    assert "ckpts/myrun/step-2/manifest.json" in plan.uploaded
    assert ".env" not in plan.uploaded and "weights/model.safetensors" not in plan.uploaded
    assert sorted(_sent(tmp_path, plan)) == _printed(plan)


@pytest.mark.parametrize("name", ["id_dsa", "id_dsa.pub", "KEY.PEM", "Server.Key", ".ENV", "prod.ENV", ".s3cfg",
                                  ".boto", ".pgpass", ".vault-token", "terraform.tfstate", "terraform.tfstate.backup",
                                  "kubeconfig", "KUBECONFIG", ".bash_history", ".zsh_history", "token.json",
                                  "secret.yaml", "Secrets.yml", "credentials.json", "Credentials"])
def test_secret_names_are_matched_whatever_their_case(tmp_path, name):
    root = tmp_path / "repo"
    (root / "deploy").mkdir(parents=True)
    (root / "deploy" / name).write_text("s3cr3t")
    (root / "deploy" / "main.py").write_text("x")
    plan = upload_plan(root)
    assert plan.uploaded == ("deploy/main.py",)
    assert dict(plan.excluded) == {f"deploy/{name}": "secret"}


def _plant_links(root, home):
    """What the issue's probe did: links to the cluster token folder and to a folder holding a key,
    plus links that stay inside the folder."""
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("RAYTOKEN")
    (home / "keys").mkdir()
    (home / "keys" / "id_rsa").write_text("PRIVATE")
    (home / "keys" / "notes.txt").write_text("outside")
    (home / "secret.txt").write_text("outside file")
    os.symlink(home / ".ray", root / "raycfg")  # a folder link with an innocent name
    os.symlink(home / "keys", root / "stuff")
    os.symlink(home / "secret.txt", root / "readme-link.txt")  # a file link out of the folder
    os.symlink("../../outside", root / "moetrain" / "up")  # relative, out of the folder, dangling
    os.symlink("model.py", root / "moetrain" / "alias.py")  # inside, to an uploaded file
    os.symlink("../.env", root / "moetrain" / "env.txt")  # inside, to a secret
    os.symlink("moetrain", root / "pkg")  # inside, a folder


@pytest.mark.parametrize("git", [False, True])
def test_no_link_is_followed_out_of_the_folder(tmp_path, git):
    root, home = tmp_path / "repo", tmp_path / "home"
    _tree(root)
    _plant_links(root, home)
    if git:
        _git(root, "init", "-q")
        _git(root, "add", "-A")  # tracked links: git records them as links, as a user's checkout would
    plan = upload_plan(root)
    assert plan.git == git
    sent = _sent(tmp_path, plan)
    assert sorted(sent) == _printed(plan)
    blob = b"".join(sent.values())
    for secret in (b"RAYTOKEN", b"PRIVATE", b"outside", b"AWS_SECRET_ACCESS_KEY"):
        assert secret not in blob
    assert not any(n.startswith(("raycfg", "stuff", "pkg/")) for n in sent)
    assert sent["moetrain/alias.py"] == b"x = 1"  # an inside link to an uploaded file goes, as a copy
    reasons = dict(plan.excluded)
    assert reasons["raycfg"] == reasons["stuff"] == reasons["readme-link.txt"] == "link out of the folder"
    assert reasons["moetrain/up"] == "link out of the folder"
    assert reasons["moetrain/env.txt"] == reasons["pkg"] == "link to a path not uploaded"
    # --include never re-admits a link out of the folder
    plan = upload_plan(root, include=["raycfg", "stuff", "readme-link.txt"])
    assert not {"raycfg", "stuff", "readme-link.txt"} & set(plan.uploaded)


def test_in_a_git_checkout_only_what_git_considers_goes(tmp_path):
    root = tmp_path / "repo"
    _tree(root)
    (root / ".gitignore").write_text("scratch/\n*.log\n.venv/\n")
    for rel, text in {"scratch/big.txt": "tmp", "debug.log": "log", "extra.py": "untracked, not ignored"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    _git(root, "init", "-q")
    _git(root, "add", "train.py", "moetrain/model.py", "notes.md", ".gitignore", ".env")  # .env tracked by mistake
    (root / "sub").mkdir()
    plan = upload_plan(root / "sub")  # a folder of the checkout with nothing in it
    assert plan.git and plan.uploaded == ()
    plan = upload_plan(root)
    assert plan.git
    assert set(plan.uploaded) == {".gitignore", "train.py", "moetrain/model.py", "notes.md", "configs/my.yaml",
                                  "extra.py"}
    assert dict(plan.excluded)[".env"] == "secret"  # the name rules apply on top of git
    assert "files git considers" in plan.describe()
    plan = upload_plan(root, include=["scratch/*"])  # the allow-list reaches what .gitignore ignores
    assert "scratch/big.txt" in plan.uploaded and "debug.log" not in plan.uploaded
    assert sorted(_sent(tmp_path, plan)) == _printed(plan)


def test_the_package_is_deterministic_and_keeps_modes(tmp_path):
    root = tmp_path / "repo"
    _tree(root)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    plan = upload_plan(root)
    a, b = write_package(plan, tmp_path / "a.zip"), write_package(plan, tmp_path / "b.zip")
    assert a.read_bytes() == b.read_bytes()  # same files, same package hash: Ray reuses the upload
    with zipfile.ZipFile(a) as z:
        assert (z.getinfo("run.sh").external_attr >> 16) & 0o777 == 0o755


def test_dry_run_prints_the_list_and_submits_nothing(tmp_path):
    """`moetrain submit --dry-run` on this checkout: the files git considers, one per line, then
    the count; no cluster is contacted (the address answers nothing)."""
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "submit", "--dry-run", "--address",
                           "http://127.0.0.1:1", "--", "--config", "tiny"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    listed = [line.strip() for line in lines[:-1]]
    assert f"uploading {len(listed)} file(s) (files git considers)" in lines[-1]
    assert listed == list(upload_plan(REPO).uploaded)
    assert "cluster/submit.py" in listed and not any(n.startswith((".venv", ".git/")) for n in listed)
