"""What `moetrain submit` uploads: secrets, data, checkpoints and bulk stay home unless allow-listed.
Checked on the zip Ray's own runtime_env packager builds from our excludes."""

from __future__ import annotations

import zipfile

from cluster.submit import runtime_env
from cluster.upload import upload_plan


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


def _ray_zip(tmp_path, env) -> set[str]:
    from ray._private.runtime_env.packaging import create_package

    out = tmp_path / "pkg.zip"
    create_package(env["working_dir"], out, include_gitignore=True, excludes=env["excludes"])
    with zipfile.ZipFile(out) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def test_secrets_data_checkpoints_and_bulk_stay_home(tmp_path):
    root = tmp_path / "repo"
    _tree(root)
    plan = upload_plan(root)
    assert set(plan.uploaded) == {"train.py", "moetrain/model.py", "notes.md", "configs/my.yaml"}
    reasons = dict(plan.excluded)
    assert reasons[".env"] == reasons["configs/.env.prod"] == reasons[".aws"] == "secret"
    assert reasons["keys/server.pem"] == reasons["home/.ssh"] == reasons["gcp/service-account-prod.json"] == "secret"
    assert reasons["data/shard-0.parquet"] == reasons["weights/model.safetensors"] == "data"
    assert reasons["ckpts/myrun"] == "checkpoint"
    assert "left out: 2 bulk, 1 checkpoint, 2 data, 6 secret" in plan.describe()
    # What Ray itself would upload with these excludes.
    assert _ray_zip(tmp_path, runtime_env(root)) == set(plan.uploaded)


def test_an_explicit_allow_list_re_admits_paths(tmp_path):
    root = tmp_path / "repo"
    _tree(root)
    plan = upload_plan(root, include=["data/*.parquet", "ckpts/myrun"])
    assert "data/shard-0.parquet" in plan.uploaded
    assert "ckpts/myrun/step-2/manifest.json" in plan.uploaded
    assert ".env" not in plan.uploaded and "weights/model.safetensors" not in plan.uploaded
    assert _ray_zip(tmp_path, runtime_env(root, include=["data/*.parquet", "ckpts/myrun"])) == set(plan.uploaded)
