"""The Helm chart (deploy/helm/understudy) through a real helm, built from its Go module by
devtools/helm.py (cached; tests/run.sh builds it before pytest starts): `helm lint`, `helm
template` with default and non-default values, every rendered object against the Kubernetes
schemas, the configs and command lines accepted by the programs' own parsers, and the default
rendering equal in content to the kustomize base (`kubectl kustomize deploy/k8s`) where they
overlap. A helm that cannot be built fails these tests; it never skips them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from devtools import helm as helm_build
from devtools.kafka_broker import cache_root
from evaluator.config import parse_config as parse_evaluator_config
from gateway.config import parse_config as parse_gateway_config
from tests.integration.test_deploy import (
    CRD_GROUP,
    K8S,
    K8S_VERSIONS,
    ROOT,
    container_env,
    find,
    parse_command,
    pod_spec,
)

# A cold build of helm takes minutes (devtools/helm.py): whichever test builds it may wait.
pytestmark = pytest.mark.timeout(helm_build.BUILD_TIMEOUT_S + 300)

CHART = ROOT / "deploy" / "helm" / "understudy"
NAMESPACE = "understudy"

# Everything a platform team typically changes, at once.
CUSTOM_VALUES: dict[str, Any] = {
    "image": {"gateway": {"repository": "registry.example.com/ml/understudy-gateway",
                          "tag": "0.1.1", "pullPolicy": "Always"},
              "evaluator": {"repository": "registry.example.com/ml/understudy-evaluator",
                            "tag": "0.1.1"}},
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "triton": {"url": "http://triton-cpu.models:8000",
               "models": {"fraud_v5": {"url": "http://triton-gpu1.models:8000"}}},
    "kafka": {"bootstrap": "kafka-0.kafka:9092,kafka-1.kafka:9092"},
    "secrets": {"admin": {"name": "platform-tokens", "tokenKey": "write",
                          "readTokenKey": "read"},
                "feedback": {"name": "label-producers", "key": "token"}},
    "gateway": {"replicaCount": 3, "autoscaling": {"enabled": False},
                "podDisruptionBudget": {"enabled": False},
                "resources": {"requests": {"cpu": "1", "memory": "512Mi"},
                              "limits": {"cpu": "4", "memory": "2Gi"}},
                "extraEnv": [{"name": "UNDERSTUDY_TRITON_TIMEOUT_MS", "value": "1500"}],
                "nodeSelector": {"pool": "cpu"},
                "config": {"routes": {"churn": {"champion": {"model": "churn_v1"}}}}},
    "evaluator": {"persistence": {"existingClaim": "evaluator-store-2025",
                                  "storageClass": "unused-with-an-existing-claim"},
                  "config": {"routes": {"churn": {"task": "classification"}}}},
    "report": {"routes": ["churn"], "schedule": "0 6 * * 1-5",
               "pushgatewayUrl": "http://pushgateway.monitoring:9091"},
    "serviceMonitor": {"enabled": False},
    "prometheusRule": {"enabled": False},
    "grafanaDashboard": {"enabled": False},
}


@pytest.fixture(scope="module")
def helm() -> Path:
    """The helm binary; a cold build takes minutes (see devtools/helm.py), hence the timeout."""
    return helm_build.ensure()


def run_helm(helm: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120,
                          check=False)
    if ok and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def render(helm: Path, values: dict[str, Any] | None, tmp: Path,
           release: str = "understudy") -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        path = tmp / f"values-{release}.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["--values", str(path)]
    out = run_helm(helm, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def default_docs(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(helm, None, tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def custom_docs(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(helm, CUSTOM_VALUES, tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def kustomize_built() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl (on this machine image) builds the kustomization"
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


# -- the binary --------------------------------------------------------------------------------


def test_helm_is_the_pinned_build_from_the_projects_cache(helm: Path) -> None:
    assert helm == helm_build.binary()
    assert helm.is_relative_to(cache_root())
    shown = run_helm(helm, "version", "--short").stdout.strip()
    assert shown.startswith(helm_build.DEFAULT_VERSION), shown
    proc = subprocess.run([sys.executable, "-m", "devtools.helm", "path"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == str(helm)


# -- lint and schemas --------------------------------------------------------------------------


def test_helm_lint_strict_with_default_and_custom_values(helm: Path, tmp_path: Path) -> None:
    values = tmp_path / "custom.yaml"
    values.write_text(yaml.safe_dump(CUSTOM_VALUES))
    for extra in ([], ["--values", str(values)]):
        proc = run_helm(helm, "lint", "--strict", str(CHART), *extra)
        assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout, proc.stdout
        assert "[ERROR]" not in proc.stdout and "[WARNING]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_helm_renders_valid_kubernetes_objects(default_docs, custom_docs, version: str) -> None:
    for docs in (default_docs, custom_docs):
        for doc in docs:
            assert doc["metadata"]["namespace"] == NAMESPACE
            if doc["apiVersion"] == CRD_GROUP:
                continue  # CRDs: compared with the kustomize base's below
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (k8s {version}): "
                            f"{str(exc).splitlines()[0]} at {list(exc.path)}")


# -- the default rendering is the kustomize base ------------------------------------------------

# Maps where the chart may add entries to the base's (Helm's labels, a config checksum that rolls
# the pods on a config change); every entry of the base's must be there with the same value.
SUPERSET_KEYS = {"labels", "matchLabels", "annotations"}


def assert_same_content(helm_obj: Any, base: Any, where: str) -> None:
    """helm_obj equals base, except that maps under SUPERSET_KEYS (and a Service's selector)
    may hold more entries, and config files compare as parsed YAML/JSON."""
    if isinstance(base, dict):
        assert isinstance(helm_obj, dict), f"{where}: {helm_obj!r} is not a mapping"
        key = where.rsplit(".", 1)[-1]
        if key in SUPERSET_KEYS or where.endswith("Service.spec.selector"):
            missing = {k: v for k, v in base.items() if helm_obj.get(k) != v}
            assert not missing, f"{where}: the chart lacks {missing} (has {helm_obj})"
            return
        base = {**{k: {} for k in SUPERSET_KEYS & set(helm_obj)}, **base}
        assert set(helm_obj) == set(base), (
            f"{where}: keys differ: chart only {sorted(set(helm_obj) - set(base))}, "
            f"base only {sorted(set(base) - set(helm_obj))}")
        for k in base:
            assert_same_content(helm_obj[k], base[k], f"{where}.{k}")
    elif isinstance(base, list):
        assert isinstance(helm_obj, list), f"{where}: {helm_obj!r} is not a list"
        assert len(helm_obj) == len(base), f"{where}: {len(helm_obj)} items, base {len(base)}"
        for i, (h, b) in enumerate(zip(helm_obj, base, strict=True)):
            assert_same_content(h, b, f"{where}[{i}]")
    else:
        assert helm_obj == base, f"{where}: chart {helm_obj!r}, base {base!r}"


def parsed_data(configmap: dict[str, Any]) -> dict[str, Any]:
    """A ConfigMap's files as their programs read them (YAML and JSON parsed, scripts as text)."""
    out = {}
    for key, text in configmap["data"].items():
        if key.endswith((".yaml", ".yml")):
            out[key] = yaml.safe_load(text)
        elif key.endswith(".json"):
            out[key] = json.loads(text)
        else:
            out[key] = text
    return out


def test_helm_defaults_render_the_kustomize_base(default_docs, kustomize_built) -> None:
    base = {(d["kind"], d["metadata"]["name"]): d for d in kustomize_built}
    chart = {(d["kind"], d["metadata"]["name"]): d for d in default_docs}
    assert len(chart) == len(default_docs), "the chart renders an object twice"
    # The Namespace is Helm's (`--create-namespace`); everything else is the same set of objects.
    assert set(chart) == set(base) - {("Namespace", NAMESPACE)}
    for key, base_doc in base.items():
        if key[0] == "Namespace":
            continue
        helm_doc = dict(chart[key])
        base_doc = dict(base_doc)
        if key[0] == "ConfigMap":
            helm_doc["data"] = parsed_data(helm_doc)
            base_doc["data"] = parsed_data(base_doc)
        assert_same_content(helm_doc, base_doc, key[0])


def test_helm_default_configs_and_commands_are_accepted(default_docs) -> None:
    check_configs_and_commands(default_docs)


# -- non-default values ----------------------------------------------------------------------


def check_configs_and_commands(docs: list[dict[str, Any]]) -> tuple[Any, Any]:
    """Each workload's command parses, and each program accepts its config with its env."""
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "gateway.yaml" in d["data"])
    data = config["data"]
    gateway_dep = next(d for d in docs if d["kind"] == "Deployment"
                       and pod_spec(d)["containers"][0]["name"] == "gateway")
    (container,) = pod_spec(gateway_dep)["containers"]
    program, args = parse_command(container["args"])
    assert (program, args.command, args.workers) == ("gateway", "serve", 1)
    gateway = parse_gateway_config(yaml.safe_load(data["gateway.yaml"]),
                                   env=container_env(gateway_dep))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": gateway.listen.port, "grpc": gateway.listen.grpc_port}
    evaluator = parse_evaluator_config(yaml.safe_load(data["evaluator.yaml"]), env={})
    for doc in docs:
        if doc["kind"] == "Deployment" and doc is not gateway_dep:
            (container,) = pod_spec(doc)["containers"]
            assert parse_command(container["args"])[:1] == ("evaluator",)
            parse_evaluator_config(yaml.safe_load(data["evaluator.yaml"]),
                                   env=container_env(doc))
    service = next(d for d in docs if d["kind"] == "Service")
    http = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    assert evaluator.gateway.url == f"http://{service['metadata']['name']}:{http}"
    assert evaluator.source.kafka.bootstrap == gateway.log.kafka.bootstrap
    return gateway, evaluator


def test_helm_custom_values(custom_docs) -> None:
    kinds = {d["kind"] for d in custom_docs}
    # Toggles: no HPA, PDB, ServiceMonitor, PrometheusRule, dashboard; an existing claim.
    assert kinds == {"ConfigMap", "Service", "Deployment", "CronJob"}
    gateway_dep = find(custom_docs, "Deployment", "understudy-gateway")
    assert gateway_dep["spec"]["replicas"] == 3
    spec = pod_spec(gateway_dep)
    assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert spec["nodeSelector"] == {"pool": "cpu"}
    (container,) = spec["containers"]
    assert container["image"] == "registry.example.com/ml/understudy-gateway:0.1.1"
    assert container["imagePullPolicy"] == "Always"
    assert container["resources"] == CUSTOM_VALUES["gateway"]["resources"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
            if "valueFrom" in e}
    assert refs == {
        "UNDERSTUDY_ADMIN_TOKEN": {"name": "platform-tokens", "key": "write"},
        "UNDERSTUDY_ADMIN_READ_TOKEN": {"name": "platform-tokens", "key": "read",
                                        "optional": True},
        "UNDERSTUDY_FEEDBACK_TOKEN": {"name": "label-producers", "key": "token"}}

    gateway, evaluator = check_configs_and_commands(custom_docs)
    assert gateway.triton.url == "http://triton-cpu.models:8000"
    assert gateway.triton.timeout_ms == 1500  # extraEnv overrides the file, as documented
    assert {name: m.url for name, m in gateway.triton.models.items()} == {
        "fraud_v5": "http://triton-gpu1.models:8000"}
    assert gateway.log.kafka.bootstrap == "kafka-0.kafka:9092,kafka-1.kafka:9092"
    assert "churn" in gateway.routes
    assert "churn" in evaluator.routes

    evaluator_dep = find(custom_docs, "Deployment", "understudy-evaluator")
    (container,) = pod_spec(evaluator_dep)["containers"]
    assert container["image"] == "registry.example.com/ml/understudy-evaluator:0.1.1"
    claims = {v["persistentVolumeClaim"]["claimName"]
              for d in (evaluator_dep, find(custom_docs, "CronJob", "understudy-report"))
              for v in pod_spec(d)["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"evaluator-store-2025"}

    cron = find(custom_docs, "CronJob", "understudy-report")
    assert cron["spec"]["schedule"] == "0 6 * * 1-5"
    (job,) = pod_spec(cron)["containers"]
    assert job["image"] == "registry.example.com/ml/understudy-evaluator:0.1.1"
    env = {e["name"]: e["value"] for e in job["env"]}
    assert env == {"REPORT_ROUTES": "churn",
                   "PUSHGATEWAY_URL": "http://pushgateway.monitoring:9091"}


def test_helm_release_name_prefixes_objects_and_selects_its_own_pods(helm: Path,
                                                                     tmp_path: Path) -> None:
    docs = render(helm, None, tmp_path, release="shadow")
    names = {d["metadata"]["name"] for d in docs}
    assert "shadow-understudy-gateway" in names
    assert all(n.startswith("shadow-understudy") for n in names)
    gateway_dep = find(docs, "Deployment", "shadow-understudy-gateway")
    selector = gateway_dep["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/instance"] == "shadow"
    for doc in docs:  # the Service, PDB, ServiceMonitor and report affinity select these pods
        if doc["kind"] in ("Service", "PodDisruptionBudget", "ServiceMonitor"):
            chosen = doc["spec"]["selector"]
            chosen = chosen.get("matchLabels", chosen)
            assert chosen == selector, doc["kind"]
    check_configs_and_commands(docs)


def test_helm_refuses_a_report_without_the_evaluator(helm: Path, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"evaluator": {"enabled": False}}))
    proc = run_helm(helm, "template", "understudy", str(CHART), "--values", str(values), ok=False)
    assert proc.returncode != 0
    assert "report.enabled needs evaluator.enabled" in proc.stderr
    values.write_text(yaml.safe_dump({"evaluator": {"enabled": False},
                                      "report": {"enabled": False}}))
    docs = [d for d in yaml.safe_load_all(
        run_helm(helm, "template", "understudy", str(CHART), "--values", str(values)).stdout)
        if d]
    assert not [d for d in docs if "evaluator" in d["metadata"]["name"]]
