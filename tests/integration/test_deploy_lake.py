"""deploy/k8s-lake: the evaluator as ingest members of a shared lake, the report over all of it,
and the Spark report on Kubernetes — built with kubectl's kustomize, checked against the
Kubernetes schemas, and each workload's environment read by the evaluator's own config parser.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml

from evaluator.config import parse_config
from tests.integration.test_deploy import K8S_VERSIONS, ROOT, find
from tests.integration.test_deploy import (
    test_k8s_manifests_match_the_kubernetes_schemas as check_schemas,
)

OVERLAY = ROOT / "deploy" / "k8s-lake"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl (on this machine image) builds the kustomization"
    out = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def _config(docs: list[dict[str, Any]], container: dict[str, Any]) -> Any:
    """The evaluator config a container runs with: the ConfigMap's file plus its env."""
    raw = yaml.safe_load(find(docs, "ConfigMap", "understudy-config")["data"]["evaluator.yaml"])
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return parse_config(raw, env=env)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_matches_the_kubernetes_schemas(docs, version: str) -> None:
    """The base's schema check over the overlay's build (base resources included)."""
    assert {"ServiceAccount", "Role", "RoleBinding"} <= {d["kind"] for d in docs}
    check_schemas(docs, version)


def test_evaluator_members_scale_by_replicas_with_no_local_state(docs) -> None:
    evaluator = find(docs, "Deployment", "understudy-evaluator")
    assert evaluator["spec"]["replicas"] >= 2
    assert evaluator["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = _pod(evaluator)
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    container = pod["containers"][0]
    config = _config(docs, container)
    assert config.lake.path.startswith("s3://")
    assert config.source.type == "kafka"  # one consumer group: the replicas share partitions
    member = next(e for e in container["env"] if e["name"] == "UNDERSTUDY_LAKE_MEMBER")
    assert member["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_reports_read_the_shared_lake(docs) -> None:
    daily = find(docs, "CronJob", "understudy-report")
    assert "affinity" not in _pod(daily)  # no longer pinned next to the evaluator's volume
    lake_path = _config(docs, find(docs, "Deployment", "understudy-evaluator")
                        ["spec"]["template"]["spec"]["containers"][0]).lake.path
    assert _config(docs, _pod(daily)["containers"][0]).lake.path == lake_path

    spark = find(docs, "CronJob", "understudy-report-spark")
    pod = _pod(spark)
    container = pod["containers"][0]
    config = _config(docs, container)
    assert (config.lake.path, config.lake.engine) == (lake_path, "spark")
    assert config.spark.master.startswith("k8s://https://")
    assert config.spark.lake_url == lake_path.replace("s3://", "s3a://", 1)
    assert container["command"] == _pod(daily)["containers"][0]["command"]  # same report.sh

    # The driver may create its executors: a Role granting pods, bound to the pod's account.
    binding = find(docs, "RoleBinding", "understudy-spark-driver")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    role = find(docs, "Role", binding["roleRef"]["name"])
    assert any("pods" in r["resources"] and {"create", "delete"} <= set(r["verbs"])
               for r in role["rules"])
    assert pod["automountServiceAccountToken"] is True

    # Spark's own settings come from the mounted spark-defaults.conf; its fixed driver ports
    # are the ones the container declares.
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["SPARK_CONF_DIR"])
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    defaults = find(docs, "ConfigMap", volume["configMap"]["name"])["data"]["spark-defaults.conf"]
    conf = dict(line.split(None, 1) for line in defaults.splitlines()
                if line.strip() and not line.startswith("#"))
    assert conf["spark.kubernetes.namespace"] == "understudy"
    ports = {p["containerPort"] for p in container["ports"]}
    assert {int(conf["spark.driver.port"]), int(conf["spark.blockManager.port"])} == ports


def test_spark_image_adds_java_and_pyspark_to_the_evaluator() -> None:
    dockerfile = (ROOT / "deploy" / "spark" / "Dockerfile").read_text()
    assert "openjdk-17-jre-headless" in dockerfile
    assert "['optional-dependencies']['spark']" in dockerfile  # the one pin: pyproject's
    assert "import pyspark, evaluator.lake.spark_engine" in dockerfile
