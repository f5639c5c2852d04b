"""The cluster definitions pass Ray's own validation, so a broken file fails CI rather than `ray up`.

aws.yaml / local.yaml: Ray's cluster-launcher schema (``prepare_config`` + ``validate_config``) and, for AWS, every
``node_config`` field checked against EC2's RunInstances request shape from botocore's service model.
kuberay.yaml: the RayCluster (and the RayJob's cluster spec) turned into an autoscaling config by Ray's own KubeRay
translation and validated the same way; top-level spec fields checked against the KubeRay v1 CRD field names.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import botocore.session
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"

# Field names of the KubeRay v1 CRDs (ray-project/kuberay ray-operator/config/crd/bases/ray.io_rayclusters.yaml and
# ray.io_rayjobs.yaml): a misspelt field is silently dropped by the API server, so it is caught here instead.
RAYCLUSTER_SPEC = {"autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
                   "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "upgradeStrategy",
                   "workerGroupSpecs"}  # fmt: skip
HEAD_GROUP = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP = {"groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts", "rayStartParams",
                "replicas", "scaleStrategy", "suspend", "template"}  # fmt: skip
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
               "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
               "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}  # fmt: skip


def launcher_config(name: str) -> dict[str, Any]:
    config = prepare_config(yaml.safe_load((CLUSTER / name).read_text()))
    validate_config(config)
    return config


def check_ec2_fields(value: Any, shape: Any, where: str) -> None:
    """Every key of ``value`` is a member of botocore ``shape`` (recursively through structures and lists)."""
    if shape.type_name == "structure":
        assert isinstance(value, dict), where
        for key, item in value.items():
            assert key in shape.members, f"{where}.{key} is not an EC2 RunInstances field"
            check_ec2_fields(item, shape.members[key], f"{where}.{key}")
    elif shape.type_name == "list":
        for i, item in enumerate(value):
            check_ec2_fields(item, shape.member, f"{where}[{i}]")


def test_aws_cluster_is_valid_for_the_launcher_and_ec2() -> None:
    config = launcher_config("aws.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert {t["node_config"]["InstanceType"] for n, t in types.items() if n != "head"} == {"g5.12xlarge",
                                                                                           "p4d.24xlarge"}  # fmt: skip
    assert all(types[n]["min_workers"] == 0 for n in ("gpu-g5", "gpu-p4d"))  # autoscaling from zero
    run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    for name, node in types.items():
        check_ec2_fields(node["node_config"], run_instances.input_shape, f"{name}.node_config")
    text = (CLUSTER / "aws.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id", text, re.I)  # no keys
    assert all(t["node_config"]["IamInstanceProfile"] == {"Name": "ferdist-ray-node"} for t in types.values())
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_local_cluster_is_valid_for_the_launcher() -> None:
    config = launcher_config("local.yaml")
    assert config["provider"]["type"] == "local" and len(config["provider"]["worker_ips"]) == 2
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_a_broken_launcher_file_fails_validation() -> None:
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["available_node_types"]["gpu-g5"]["min_worker"] = 1  # misspelt
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["available_node_types"]["gpu-g5"]["node_config"]["InstanceTyp"] = "g5.xlarge"
    run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    with pytest.raises(AssertionError, match="InstanceTyp is not an EC2 RunInstances field"):
        check_ec2_fields(config["available_node_types"]["gpu-g5"]["node_config"], run_instances.input_shape, "g5")


def kuberay_docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text())}


def as_cluster(spec: dict[str, Any]) -> dict[str, Any]:
    """A RayCluster resource as the API server hands it to Ray's autoscaler (namespace filled in)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "t", "namespace": "default"},
            "spec": copy.deepcopy(spec)}  # fmt: skip


def check_cluster_spec(spec: dict[str, Any]) -> dict[str, Any]:
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP
    config = _derive_autoscaling_config_from_ray_cr(as_cluster(spec))
    validate_config(config)
    return config


def test_kuberay_cluster_and_job_are_valid() -> None:
    docs = kuberay_docs()
    assert docs["RayCluster"]["apiVersion"] == docs["RayJob"]["apiVersion"] == "ray.io/v1"
    config = check_cluster_spec(docs["RayCluster"]["spec"])
    gpu = config["available_node_types"]["gpu"]
    assert (gpu["min_workers"], gpu["max_workers"], gpu["resources"]["GPU"]) == (0, 8, 1)
    assert config["available_node_types"]["headgroup"]["resources"]["CPU"] == 0
    job = docs["RayJob"]["spec"]
    assert set(job) <= RAYJOB_SPEC, set(job) - RAYJOB_SPEC
    assert job["entrypoint"].startswith("python jobs/train.py --config jobs/configs/")
    assert check_cluster_spec(job["rayClusterSpec"])["available_node_types"]["gpu"]["min_workers"] == 4
    assert docs["RayCluster"]["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"  # not exposed


def test_dockerfile_copies_what_exists() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    root = CLUSTER.parent
    for sources in re.findall(r"^COPY\s+(.+)\s+\S+$", text, re.M):
        for source in sources.split():
            assert (root / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M) and "USER ray" in text
