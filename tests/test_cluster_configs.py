"""cluster/: the AWS launcher YAML validates against the installed Ray's cluster schema, the KubeRay
RayJob against a JSON schema of the fields we use, and both agree with the code they launch."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from dsl.cli import load_job, parse

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_RESOURCES = {"type": "object", "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}},
              "additionalProperties": False}
_CONTAINER = {"type": "object", "required": ["name", "image"], "properties": {
    "name": {"type": "string"}, "image": {"type": "string", "pattern": ":"},
    "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
    "resources": _RESOURCES, "env": {"type": "array"}}}
_POD = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
        "serviceAccountName": {"type": "string"}, "tolerations": {"type": "array"},
        "nodeSelector": _STR_MAP}}}}
# KubeRay ray.io/v1 RayJob, restricted to the fields cluster/rayjob.yaml uses (types as in the CRD)
RAYJOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}, "labels": _STR_MAP}},
        "spec": {"type": "object", "required": ["entrypoint", "rayClusterSpec"], "additionalProperties": False,
                 "properties": {
                     "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
                     "shutdownAfterJobFinishes": {"type": "boolean"},
                     "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                     "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                     "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                     "submitterConfig": {"type": "object", "properties": {
                         "backoffLimit": {"type": "integer", "minimum": 0}}},
                     "rayClusterSpec": {
                         "type": "object", "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
                         "additionalProperties": False, "properties": {
                             "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                             "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                                               "properties": {"rayStartParams": _STR_MAP, "template": _POD}},
                             "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                                 "type": "object", "required": ["groupName", "template"], "properties": {
                                     "groupName": {"type": "string"},
                                     "replicas": {"type": "integer", "minimum": 0},
                                     "minReplicas": {"type": "integer", "minimum": 0},
                                     "maxReplicas": {"type": "integer", "minimum": 0},
                                     "rayStartParams": _STR_MAP, "template": _POD}}}}}}}}}


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_aws_launcher_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _yaml("aws.yaml")
    validate_config(prepare_config(copy.deepcopy(cfg)))  # ray-schema.json of the installed Ray
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["head"]["no_such_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_aws_layout_cpu_head_gpu_workers_loopback_dashboard_package_installed():
    import ray

    cfg = _yaml("aws.yaml")
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = nodes["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert cfg["docker"]["image"].split(":")[1].startswith(ray.__version__)
    assert any("pip install" in c and "-e /home/ray/dsl" in c for c in cfg["setup_commands"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_rayjob_manifest_validates_and_runs_our_job():
    import ray

    job = _yaml("rayjob.yaml")
    jsonschema.validate(job, RAYJOB_SCHEMA)
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert ray.__version__ in container["image"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the entrypoint's keys are accepted by jobs/finetune.py's parser
    words = spec["entrypoint"].split()
    assert words[:2] == ["python", "/app/jobs/finetune.py"]
    mode, cfg = parse(load_job("jobs/finetune.py"), words[2:])
    assert mode == "train" and cfg.service.workers == 4 and cfg.service.gpus_per_worker == 1 and cfg.name == "owt-dsl"
    assert "AWS_SECRET" not in (CLUSTER / "rayjob.yaml").read_text()
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RAYJOB_SCHEMA)
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_runtime_env_is_a_valid_ray_runtime_env_without_secrets():
    from ray.runtime_env import RuntimeEnv

    env = _yaml("runtime_env.yaml")
    RuntimeEnv(**env)  # raises on unknown/ill-typed fields
    assert env["working_dir"] == "." and ".git" in env["excludes"]
    assert not any(k.startswith("AWS_") for k in env["env_vars"])


def test_local_cluster_script_usage():
    out = subprocess.run(["bash", str(CLUSTER / "local_cluster.sh")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "usage:" in out.stderr
    out = subprocess.run(["bash", "-n", str(CLUSTER / "local_cluster.sh")], capture_output=True, text=True)
    assert out.returncode == 0
