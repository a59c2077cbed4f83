"""The cluster recipes in cluster/configs/ are well formed for the tools that read them.

- ``ray-cluster.yaml`` validates against the cluster-launcher JSON schema shipped inside the
  installed ray package (``ray/autoscaler/ray-schema.json``), and through ``ray up``'s own
  ``prepare_config`` + ``validate_config`` (defaults filled in, offline: no cloud calls).
- ``rayjob.yaml`` is checked against a JSON schema written here from KubeRay's v1 API types
  (``ray-operator/apis/ray/v1/rayjob_types.go`` and ``raycluster_types.go``: fields without
  ``omitempty`` are required) plus the parts of core/v1 ``PodTemplateSpec`` the CRD requires
  (``containers``, each with a ``name``). The full generated CRD (``ray.io_rayjobs.yaml``, ~1.1 MB
  of openAPIV3Schema, mostly the embedded pod templates) is not vendored here; unknown keys are
  rejected at the levels KubeRay defines, which catches typos the API server would silently prune.
- ``local_cluster.sh`` passes ``bash -n``; the entrypoints' training arguments load as configs.
"""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "cluster" / "configs"


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "rayjob.yaml"])
def test_yaml_parses(name):
    assert isinstance(_load(name), dict)


# ---- ray up --------------------------------------------------------------------------------------
def test_ray_up_yaml_validates_against_rays_own_schema():
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    cfg = _load("ray-cluster.yaml")
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for name, node in cfg["available_node_types"].items():
        assert node.get("min_workers", 0) <= node.get("max_workers", cfg["max_workers"]), name


def test_ray_up_yaml_passes_ray_up_config_preparation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_load("ray-cluster.yaml")))
    validate_config(prepared)  # schema again, plus head_node_type / defaults consistency
    setup = " ".join(prepared["head_setup_commands"])
    assert "torch==2.13.0" in setup and "download.pytorch.org/whl/cpu" in setup
    assert any("--metrics-export-port" in c for c in prepared["head_start_ray_commands"])


# ---- KubeRay RayJob ---------------------------------------------------------------------------------
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {  # core/v1 PodTemplateSpec: the parts the CRD requires
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string"}, "image": {"type": "string"},
                               "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                               "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
                               "resources": {"type": "object"}}}}},
        },
    },
}
_HEAD_GROUP = {
    "type": "object", "additionalProperties": False,
    # rayStartParams has no omitempty in the v1 types we read (newer KubeRay made it optional).
    "required": ["rayStartParams", "template"],
    "properties": {"serviceType": {"type": "string"}, "headService": {"type": "object"},
                   "enableIngress": {"type": "boolean"}, "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE},
}
_WORKER_GROUP = {
    "type": "object", "additionalProperties": False,
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer"},
                   "minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"},
                   "numOfHosts": {"type": "integer"}, "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE,
                   "scaleStrategy": {"type": "object"}},
}
RAYJOB_V1_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "rayClusterSpec": {
                    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
                    "properties": {"headGroupSpec": _HEAD_GROUP, "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
                                   "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                                   "autoscalerOptions": {"type": "object"}, "headServiceAnnotations": _STR_MAP,
                                   "suspend": {"type": "boolean"}},
                },
                "submitterPodTemplate": _POD_TEMPLATE, "metadata": _STR_MAP, "clusterSelector": _STR_MAP,
                "submitterConfig": {"type": "object"}, "managedBy": {"type": "string"},
                "deletionStrategy": {"type": "object"}, "entrypoint": {"type": "string"},
                "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                "entrypointResources": {"type": "string"}, "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"}, "ttlSecondsAfterFinished": {"type": "integer"},
                "shutdownAfterJobFinishes": {"type": "boolean"}, "suspend": {"type": "boolean"},
                "schedule": {"type": "string"},
            },
        },
    },
}


def test_rayjob_matches_kuberay_v1_structure():
    job = _load("rayjob.yaml")
    jsonschema.validate(job, RAYJOB_V1_SCHEMA)
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["entrypoint"].startswith("python -m cluster.cli train --config ")
    assert spec["rayClusterSpec"]["workerGroupSpecs"], "expected at least one worker group"


def test_rayjob_schema_rejects_what_kuberay_would():
    job = _load("rayjob.yaml")
    bad = copy.deepcopy(job)
    del bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAYJOB_V1_SCHEMA)
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True  # typo: pruned silently by the API server
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAYJOB_V1_SCHEMA)


def test_rayjob_resources_fit_the_training_config():
    """The entrypoint's arguments load as a valid config whose ranks fit the worker pods."""
    from cluster.cli import _parser
    from moetrain.config import load_config

    job = _load("rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "cluster.cli", "train"]
    ns = _parser().parse_args(argv[3:])
    cfg = load_config(ns.config, ns.overrides)
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    worker_cpus = sum(int(g["minReplicas"]) * float(g["rayStartParams"]["num-cpus"]) for g in groups)
    assert cfg.cluster.num_workers * cfg.cluster.cpus_per_worker <= worker_cpus


# ---- local recipe ---------------------------------------------------------------------------------
def test_local_cluster_recipe_is_valid_bash():
    bash = shutil.which("bash")
    assert bash
    script = CONFIGS / "local_cluster.sh"
    proc = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    for needle in ("ray start --head", "--temp-dir", "RAY_AUTH_MODE", "ray start --address", "ray stop"):
        assert needle in text, needle


def test_recipes_turn_token_auth_on_and_never_disable_it_by_default():
    assert "RAY_AUTH_MODE:-token" in (CONFIGS / "local_cluster.sh").read_text()
    assert "RAY_AUTH_MODE:-disabled" not in (CONFIGS / "local_cluster.sh").read_text()
    up = _load("ray-cluster.yaml")
    for cmd in up["head_start_ray_commands"][1:] + up["worker_start_ray_commands"][1:]:
        assert "export RAY_AUTH_MODE=token" in cmd and "0.0.0.0" not in cmd, cmd
    assert up["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any(".env" in p for p in up["rsync_exclude"]) and any(".aws" in p for p in up["rsync_exclude"])
    job = _load("rayjob.yaml")
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "moetrain-ray-token"
