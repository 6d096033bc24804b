"""Deploy artifacts, validated offline: Kubernetes manifests against the Kubernetes schemas,
Prometheus rules, the Grafana dashboard, docker-compose and the Dockerfile; and, against a live
gateway's /metrics, that the rules and the dashboard only use exported families and that every
exported family is documented in docs/METRICS.md.
"""

from __future__ import annotations

import asyncio
import json
import re
import runpy
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from evaluator.cli import build_parser as evaluator_parser
from evaluator.config import parse_config as parse_evaluator_config
from gateway.cli import build_parser as gateway_parser
from gateway.config import parse_config as parse_gateway_config
from tests.conftest import GatewayFactory, fraud_body

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
RULES_FILE = DEPLOY / "prometheus" / "rules" / "understudy.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "understudy.json"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
METRICS_DOC = ROOT / "docs" / "METRICS.md"

# The oldest Kubernetes minor we support and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRD_GROUP = "monitoring.coreos.com/v1"


# -- helpers: manifests ------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomize_docs(directory: Path) -> list[dict[str, Any]]:
    """What `kustomize build` would emit, before its transformers (namespace, labels, images):
    the resources (files and kustomization directories) plus generated ConfigMaps."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml lists missing {entry}"
        docs += kustomize_docs(path) if path.is_dir() else _yaml_docs(path)
    for gen in kustomization.get("configMapGenerator", []):
        options = gen.get("options", {})
        data = {}
        for name in gen.get("files", []):
            assert "=" not in name, "key=path entries are not handled here"
            data[Path(name).name] = (directory / name).read_text()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": gen["name"], "labels": options.get("labels", {}),
                                  "annotations": options.get("annotations", {})},
                     "data": data})
    return docs


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    return kustomize_docs(K8S)


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def parse_command(argv: list[str]) -> tuple[str, Any]:
    """An image command (`<program> ARGS`; the image's entrypoint is `python -m`) parsed by
    that program's own argument parser: (program, namespace)."""
    parsers = {"gateway": gateway_parser, "evaluator": evaluator_parser}
    assert argv[0] in parsers, f"not a command of the image: {argv}"
    return argv[0], parsers[argv[0]]().parse_args(argv[1:])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- helpers: PromQL ---------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_NAME = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
             "group_right", "bool", "offset", "inf", "nan"}
_GRAFANA_VARS = re.compile(r"\$__(?:rate_interval|interval|range)\b")


def parse_promql(expr: str) -> tuple[set[str], list[tuple[str, str]], set[str]]:
    """(metric names, (metric, matcher label) pairs, labels in by/on/... clauses).

    Not a PromQL parser: enough to find the names an expression depends on, which is what a
    rename in gateway/metrics.py would silently break.
    """
    expr = _GRAFANA_VARS.sub("5m", expr)
    assert expr.count("(") == expr.count(")"), f"unbalanced parentheses: {expr}"
    matchers: list[tuple[str, str]] = []
    for metric, body in _SELECTOR.findall(_STRING.sub('""', expr)):
        matchers += [(metric, label) for label in _MATCHER.findall(body)]
    expr = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", _STRING.sub('""', expr))
    expr = _RANGE.sub(" ", expr)
    clause_labels = {lab.strip() for group in _CLAUSE.findall(expr)
                     for lab in group.split(",") if lab.strip()}
    expr = _CLAUSE.sub(" ", expr)
    names = {n for n in _NAME.findall(expr) if n.lower() not in _KEYWORDS}
    return names, matchers, clause_labels


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES_FILE.read_text())["groups"]


def rule_exprs() -> Iterator[str]:
    for group in rule_groups():
        for rule in group["rules"]:
            yield str(rule["expr"])


def recorded_names() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


def dashboard_exprs() -> Iterator[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            yield annotation["expr"]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text.strip())
            assert match, f"variable {variable['name']}: expected label_values(...), got {text}"
            yield f"group by ({match.group(2)}) ({match.group(1)})"


def pushed_names(k8s: list[dict[str, Any]]) -> set[str]:
    """Series the report CronJob pushes to the Pushgateway (written out in its script)."""
    script = find(k8s, "ConfigMap", "understudy-config")["data"]["push_report.py"]
    return set(re.findall(r"# TYPE (\w+) gauge", script))


# -- Kubernetes --------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk <= listed, f"manifests not in kustomization.yaml: {sorted(on_disk - listed)}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_schemas(k8s_docs, version: str) -> None:
    kinds = {d["kind"] for d in k8s_docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "CronJob", "ConfigMap", "ServiceMonitor", "PrometheusRule"} <= kinds
    for doc in k8s_docs:
        if doc["apiVersion"] == CRD_GROUP:
            continue  # CRDs: checked by their own tests below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (k8s {version}): "
                        f"{str(exc).splitlines()[0]} at {list(exc.path)}")


def test_kustomize_build(k8s_docs) -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl (on this machine image) builds the kustomization"
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    built = [d for d in yaml.safe_load_all(out) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in k8s_docs)
    for doc in built:
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "understudy"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "understudy"
        if doc["apiVersion"] != CRD_GROUP:
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_gateway_deployment_probes_shutdown_and_secrets(k8s_docs) -> None:
    deployment = find(k8s_docs, "Deployment", "understudy-gateway")
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # Liveness over gRPC health on the gRPC port the config listens on.
    grpc_ports = {p["containerPort"] for p in container["ports"] if p["name"] == "grpc"}
    assert {container["livenessProbe"]["grpc"]["port"]} == grpc_ports
    # Long enough for preStop + draining requests + flushing the log (see the manifest).
    assert spec["terminationGracePeriodSeconds"] >= 45
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    assert spec["securityContext"]["runAsNonRoot"] is True
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
               if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(secrets) == {"UNDERSTUDY_ADMIN_TOKEN", "UNDERSTUDY_ADMIN_READ_TOKEN",
                            "UNDERSTUDY_FEEDBACK_TOKEN"}
    assert all(ref["key"] == name for name, ref in secrets.items())
    assert {ref["name"] for name, ref in secrets.items() if "ADMIN" in name} == {"understudy-admin"}
    # Feedback is authenticated in the cluster, with its own Secret (not the admin tokens).
    assert secrets["UNDERSTUDY_FEEDBACK_TOKEN"]["name"] == "understudy-feedback"
    assert not secrets["UNDERSTUDY_FEEDBACK_TOKEN"].get("optional")
    # The command line is one the gateway accepts, with one worker per pod.
    program, args = parse_command(container["args"])
    assert (program, args.command) == ("gateway", "serve")
    assert args.workers == 1
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(args.config).parent) in mounts


def test_gateway_service_hpa_pdb_and_servicemonitor_fit_together(k8s_docs) -> None:
    deployment = find(k8s_docs, "Deployment", "understudy-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    port_names = {p["name"] for p in pod_spec(deployment)["containers"][0]["ports"]}

    service = find(k8s_docs, "Service", "understudy-gateway")
    assert selects(service["spec"]["selector"], pod_labels)
    assert {p["targetPort"] for p in service["spec"]["ports"]} == port_names == {"http", "grpc"}

    hpa = find(k8s_docs, "HorizontalPodAutoscaler", "understudy-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "understudy-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    pdb = find(k8s_docs, "PodDisruptionBudget", "understudy-gateway")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)

    monitor = find(k8s_docs, "ServiceMonitor", "understudy-gateway")
    assert monitor["apiVersion"] == CRD_GROUP
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def test_workloads_mount_what_exists(k8s_docs) -> None:
    configmaps = {d["metadata"]["name"]: d for d in k8s_docs if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for d in k8s_docs if d["kind"] == "PersistentVolumeClaim"}
    workloads = [d for d in k8s_docs if d["kind"] in ("Deployment", "CronJob")]
    assert len(workloads) == 3
    for workload in workloads:
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            if "configMap" in volume:
                data = configmaps[volume["configMap"]["name"]]["data"]
                assert {i["key"] for i in volume["configMap"].get("items", [])} <= set(data)
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in spec["containers"]:
            assert {m["name"] for m in container["volumeMounts"]} <= set(volumes)
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"requests", "limits"} <= set(container["resources"])


def test_evaluator_deployment_and_report_cronjob(k8s_docs) -> None:
    evaluator = find(k8s_docs, "Deployment", "understudy-evaluator")
    (container,) = pod_spec(evaluator)["containers"]
    program, args = parse_command(container["args"])
    assert (program, args.command) == ("evaluator", "run")
    # One store owner at a time (DuckDB, ReadWriteOnce volume).
    assert evaluator["spec"]["strategy"]["type"] == "Recreate"

    cron = find(k8s_docs, "CronJob", "understudy-report")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    spec = pod_spec(cron)
    # Scheduled next to the evaluator, whose store volume it reads.
    affinity = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert selects(affinity[0]["labelSelector"]["matchLabels"],
                   evaluator["spec"]["template"]["metadata"]["labels"])
    (job,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in job["env"]}
    assert env["PUSHGATEWAY_URL"].startswith("http://")
    assert env["REPORT_ROUTES"].split()

    data = find(k8s_docs, "ConfigMap", "understudy-config")["data"]
    assert job["command"][-1] == "/etc/understudy/report.sh"
    script = data["report.sh"]
    (line,) = [ln for ln in script.splitlines() if "-m evaluator report" in ln]
    argv = line.split("-m ", 1)[1].replace('"$route"', "fraud").replace('"$out"', "x")
    _, args = parse_command(argv.split())
    assert (args.command, args.route, args.config) == (
        "report", "fraud", "/etc/understudy/evaluator.yaml")
    assert "push_report.py" in script
    compile(data["push_report.py"], "push_report.py", "exec")


def container_env(workload: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the program sees it (secrets as placeholders)."""
    (container,) = pod_spec(workload)["containers"]
    return {e["name"]: e.get("value", "from-a-secret") for e in container.get("env", [])}


def test_configmap_configs_are_valid_for_both_programs(k8s_docs) -> None:
    """Each program accepts its config together with the environment its pods set."""
    data = find(k8s_docs, "ConfigMap", "understudy-config")["data"]
    gateway = parse_gateway_config(
        yaml.safe_load(data["gateway.yaml"]),
        env=container_env(find(k8s_docs, "Deployment", "understudy-gateway")))
    assert gateway.log.sink == "kafka"
    assert gateway.routes
    (container,) = pod_spec(find(k8s_docs, "Deployment", "understudy-gateway"))["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": gateway.listen.port, "grpc": gateway.listen.grpc_port}
    for name in ("understudy-evaluator", "understudy-report"):
        kind = "CronJob" if name == "understudy-report" else "Deployment"
        parse_evaluator_config(yaml.safe_load(data["evaluator.yaml"]),
                               env=container_env(find(k8s_docs, kind, name)))
    evaluator = parse_evaluator_config(yaml.safe_load(data["evaluator.yaml"]), env={})
    assert evaluator.source.type == "kafka"
    assert evaluator.source.kafka.inferences_topic == gateway.log.kafka.topic
    assert evaluator.source.kafka.labels_topic == gateway.log.kafka.labels_topic
    assert evaluator.gateway.url == "http://understudy-gateway:8080"


def _check_rule_group(group: dict[str, Any]) -> None:
    assert set(group) <= {"name", "interval", "rules"}
    assert group["name"]
    assert group["rules"]
    for rule in group["rules"]:
        assert ("alert" in rule) != ("record" in rule), rule
        assert isinstance(rule["expr"], str)
        assert rule["expr"].strip()
        if "record" in rule:
            assert set(rule) <= {"record", "expr", "labels"}
            assert re.fullmatch(r"[a-z_]+:[a-z_0-9]+:[a-z_0-9]+", rule["record"])
            continue
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_prometheus_rules_structure_and_prometheusrule_in_sync(k8s_docs) -> None:
    groups = rule_groups()
    for group in groups:
        _check_rule_group(group)
    alerts = [r["alert"] for g in groups for r in g["rules"] if "alert" in r]
    assert len(alerts) == len(set(alerts))
    assert {"UnderstudyGateway5xxRate", "UnderstudyGatewayOverheadHigh",
            "UnderstudyShadowShedding", "UnderstudyLogRecordsDropped", "UnderstudyLogSpilling",
            "MLPredictionScoreShift", "UnderstudyChallengerErrorRate",
            "UnderstudyChallengerLatencyRatio"} <= set(alerts)

    rule = find(k8s_docs, "PrometheusRule", "understudy")
    assert rule["apiVersion"] == CRD_GROUP
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert rule["spec"]["groups"] == groups, (
        "deploy/k8s/prometheusrule.yaml must hold exactly the groups of "
        "deploy/prometheus/rules/understudy.rules.yml")

    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["understudy-gateway"]["metrics_path"] == "/metrics"


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["route"]["multi"]
    assert variables["route"]["includeAll"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "latency", "overhead", "agreement", "score", "class share",
                  "arm shares", "log records", "kafka connected", "spill"):
        assert topic in titles, f"no panel about {topic}"
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"]
            assert target["expr"]
            parse_promql(target["expr"])


# -- docker ------------------------------------------------------------------------------------


def test_compose_file_parses_and_references_existing_files() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"kafka", "triton", "gateway", "evaluator", "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert services["triton"]["image"].startswith("nvcr.io/nvidia/tritonserver:")
    gateway_env = services["gateway"]["environment"]
    assert gateway_env["UNDERSTUDY_LOG_SINK"] == "kafka"
    assert gateway_env["UNDERSTUDY_LOG_KAFKA_BOOTSTRAP"].startswith("kafka:")
    assert gateway_env["UNDERSTUDY_TRITON_URL"].startswith("http://triton:")
    # Each program accepts its mounted config with the environment Compose gives it.
    for name, parse in (("gateway", parse_gateway_config), ("evaluator", parse_evaluator_config)):
        _, args = parse_command(services[name]["command"])
        mounts = dict(v.split(":")[1::-1] for v in services[name]["volumes"])
        config = yaml.safe_load((DEPLOY / mounts[args.config]).read_text())
        env = {k: re.sub(r"\$\{[^}]*\}", "from-the-shell", str(v))
               for k, v in services[name]["environment"].items()}
        parse(config, env=env)
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    mounts = dict(v.split(":")[:2] for v in services["triton"]["volumes"])
    assert (DEPLOY / "triton" / "models").resolve() == (DEPLOY / next(iter(mounts))).resolve()
    assert any((DEPLOY / "triton" / "models").glob("*/config.pbtxt"))
    prometheus_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert prometheus_mounts["./prometheus/rules"] == "/etc/prometheus/rules"
    # Each program runs from its own image.
    for name, target in (("gateway", "gateway"), ("evaluator", "evaluator"),
                         ("report", "evaluator")):
        assert services[name]["build"]["target"] == target, name


def test_compose_report_job_pushes_what_the_report_alerts_read(k8s_docs) -> None:
    """The report job runs the CronJob's script against the evaluator's store and pushes to a
    Pushgateway that Prometheus scrapes with the pushed labels kept, so the two alerts on
    understudy_report_* can fire in Compose too."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert services["pushgateway"]["image"].startswith("prom/pushgateway:")
    pushgateway_port = int(services["pushgateway"]["ports"][0].split(":")[-1])
    report = services["report"]
    env = {k: str(v) for k, v in report["environment"].items()}
    assert env["PUSHGATEWAY_URL"] == f"http://pushgateway:{pushgateway_port}"
    assert env["REPORT_ROUTES"].split() == ["fraud", "price"]
    assert int(env["REPORT_INTERVAL_S"]) <= 86400
    mounts = dict(v.split(":")[1::-1] for v in report["volumes"])
    data = find(k8s_docs, "ConfigMap", "understudy-config")["data"]
    for script in ("report.sh", "push_report.py"):  # the very files the ConfigMap holds
        assert (DEPLOY / mounts[f"/etc/understudy/{script}"]).read_text() == data[script]
    assert "sh /etc/understudy/report.sh" in report["command"][0]
    assert "$$REPORT_INTERVAL_S" in report["command"][0], "escaped from Compose interpolation"
    # The store it reads is the evaluator's, under the config the report script names.
    evaluator_mounts = dict(v.split(":")[1::-1] for v in services["evaluator"]["volumes"])
    assert mounts["/var/lib/understudy"] == evaluator_mounts["/var/lib/understudy"]
    assert mounts["/etc/understudy/evaluator.yaml"] == \
        evaluator_mounts["/etc/understudy/evaluator.yaml"]
    assert "/etc/understudy/evaluator.yaml" in data["report.sh"]
    # `evaluator drift` in the evaluator container pushes to the same Pushgateway.
    config = parse_evaluator_config(
        yaml.safe_load((DEPLOY / evaluator_mounts["/etc/understudy/evaluator.yaml"]).read_text()),
        env={k: str(v) for k, v in services["evaluator"]["environment"].items()})
    assert config.drift.pushgateway == env["PUSHGATEWAY_URL"]

    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    pushed = jobs["pushgateway"]
    assert pushed["honor_labels"] is True
    assert pushed["static_configs"][0]["targets"] == [f"pushgateway:{pushgateway_port}"]
    # Every alert's series has a source in Compose: the gateway's scrape or the Pushgateway.
    pushed_series = pushed_names(k8s_docs)
    report_alerts = [r for g in rule_groups() for r in g["rules"]
                     if "alert" in r and parse_promql(str(r["expr"]))[0] & pushed_series]
    assert {r["alert"] for r in report_alerts} == {"UnderstudyReportStale",
                                                   "UnderstudyChallengerPromotable"}


def dockerfile_stages() -> list[dict[str, Any]]:
    """The Dockerfile's stages in order: {"name", "base", "lines"} (continuations joined)."""
    stages: list[dict[str, Any]] = []
    for raw in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.upper().startswith("ARG "):
            continue
        if line.upper().startswith("FROM "):
            parts = line.split()
            stages.append({"base": parts[1], "name": parts[3] if len(parts) > 3 else None,
                           "lines": []})
        else:
            stages[-1]["lines"].append(line)
    return stages


def stage_chain(stages: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """A stage and the stages it is built FROM, nearest first."""
    by_name = {s["name"]: s for s in stages}
    chain = [by_name[name]]
    while chain[-1]["base"] in by_name:
        chain.append(by_name[chain[-1]["base"]])
    return chain


def instruction(chain: list[dict[str, Any]], keyword: str) -> str | None:
    """The effective argument of an instruction (the nearest stage's last one wins)."""
    for stage in chain:
        for line in reversed(stage["lines"]):
            if line.upper().startswith(keyword + " "):
                return line[len(keyword) + 1:].strip()
    return None


IMAGE_EXTRAS = {"gateway": {"aiohttp", "httptools", "tritonclient", "uvloop"},
                "evaluator": {"duckdb", "matplotlib", "statsmodels"}}


def test_dockerfile_builds_a_slim_gateway_image_and_an_evaluator_image() -> None:
    requirements = runpy.run_path(str(DEPLOY / "image" / "requirements.py"))["requirements"]
    stages = dockerfile_stages()
    names = {s["name"] for s in stages}
    for stage in stages:
        assert stage["base"] in names or "slim" in stage["base"] or \
            stage["base"] == "${PYTHON_IMAGE}", stage
        for line in stage["lines"]:
            if not line.upper().startswith("COPY ") or "--from" in line:
                continue
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    # A build without --target gives the gateway.
    assert stages[-1]["name"] == "gateway"
    other = {"gateway": "evaluator", "evaluator": "gateway"}
    for program, command in (("gateway", "serve"), ("evaluator", "run")):
        chain = stage_chain(stages, program)
        user = instruction(chain, "USER")
        assert user is not None
        assert user.split(":")[0] not in ("root", "0")
        assert json.loads(instruction(chain, "ENTRYPOINT") or "[]")[-2:] == ["python", "-m"]
        cmd = json.loads(instruction(chain, "CMD") or "[]")
        _, args = parse_command(cmd)
        assert (cmd[0], args.command) == (program, command)
        # The default config the image carries is accepted by its program, and has no routes.
        copies = [ln.split()[1:] for s in chain for ln in s["lines"]
                  if ln.upper().startswith("COPY ") and "--from" not in ln]
        (source,) = [src for src, dst in copies if dst == args.config]
        parse = parse_gateway_config if program == "gateway" else parse_evaluator_config
        config = parse(yaml.safe_load((ROOT / source).read_text()), env={})
        if program == "gateway":
            assert config.routes == {}, "the image must not ship the demo routes"
        # Its virtualenv comes from its own build stage, which installs the core and its extra.
        (venv_from,) = [ln.split()[1].split("=")[1] for s in chain for ln in s["lines"]
                        if ln.upper().startswith("COPY --FROM")]
        build = stage_chain(stages, venv_from)[0]["lines"]
        assert any(f"requirements.py {program}" in ln for ln in build), build
        if program == "gateway":
            assert not any(ln.startswith("COPY evaluator/") for ln in build)
        installed = {re.split(r"[\[<>=~!;\s]", r, maxsplit=1)[0].lower()
                     for r in requirements(ROOT / "pyproject.toml", program)}
        assert IMAGE_EXTRAS[program] <= installed
        assert not IMAGE_EXTRAS[other[program]] & installed, program


def test_each_program_imports_without_the_other_images_packages() -> None:
    """What the images install is what the programs import: the gateway's modules load with
    the evaluator's packages blocked, and the evaluator's with the gateway's blocked."""
    def modules(package: str) -> list[str]:
        return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                      for p in (ROOT / package).rglob("*.py") if p.stem != "__main__")

    # Neither image holds the repository's tools, the demo (and its local Triton) or
    # tritonclient's HTTP client (gevent), which are for tests and clients.
    outside = {"understudy_demo", "devtools", "loadtests", "tests", "sklearn"}
    gateway_blocked = IMAGE_EXTRAS["evaluator"] | outside | {"tritonclient.http", "gevent"}
    for modules_, blocked in ((modules("gateway") + modules("understudy"), gateway_blocked),
                              (modules("evaluator") + modules("understudy"),
                               IMAGE_EXTRAS["gateway"] | outside | {"grpc"})):
        script = (f"import sys\nfor name in {sorted(blocked)!r}: sys.modules[name] = None\n"
                  f"import importlib\nfor m in {modules_!r}: importlib.import_module(m)\n")
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"{modules_[0]}...: {proc.stderr[-2000:]}"


# -- metric names against a live gateway --------------------------------------------------------

# Routes that make every kind of series appear: exploration with a shadow copy, Thompson
# sampling, a regression route, all served by real Triton.
SCRAPE_ROUTES = {
    "fraud": {"champion": {"model": "fraud_v3"},
              "challengers": [{"model": "fraud_v4", "mode": "explore"},
                              {"model": "fraud_v5", "mode": "shadow", "sample_rate": 1.0}],
              "policy": {"type": "epsilon_greedy", "epsilon": 0.5}},
    "fraud_ts": {"champion": {"model": "fraud_v3"},
                 "challengers": [{"model": "fraud_v4", "mode": "explore"}],
                 "policy": {"type": "thompson"}},
    "price": {"champion": {"model": "price_v1"},
              "challengers": [{"model": "price_v2", "mode": "shadow", "sample_rate": 1.0}],
              "task": "regression"},
}
# Labels Prometheus adds to every scraped series (static configs, ServiceMonitor targets).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}


async def scrape_busy_gateway(make_gateway: GatewayFactory,
                              monkeypatch: pytest.MonkeyPatch) -> str:
    token = secrets.token_urlsafe(32)
    monkeypatch.setenv("UNDERSTUDY_ADMIN_TOKEN", token)
    gw = await make_gateway(SCRAPE_ROUTES)
    # A control-plane change, so the registry's series exist too.
    resp = await gw.session.put(gw.url + "/admin/routes/fraud/policy",
                                json={"type": "epsilon_greedy", "epsilon": 0.4},
                                headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200, await resp.text()
    rows = [[0.1 * i, 0.5, -0.2, 1.0, 0.0, 0.3, 1.0, 0.0] for i in range(8)]
    ids = []
    for i, route in enumerate(["fraud"] * 12 + ["fraud_ts"] * 6):
        resp = await gw.post_json(f"/v2/models/{route}/infer", fraud_body([rows[i % 8]], f"r{i}"))
        assert resp.status == 200
        ids.append(f"r{i}")
    for i in range(4):
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                            "data": rows[i][:4]}]}
        assert (await gw.post_json("/v2/models/price/infer", body)).status == 200
    bad = await gw.post_json("/v2/models/fraud/infer", {"inputs": "not tensors"})
    assert bad.status == 400
    feedback = [{"request_id": rid, "label": i % 2} for i, rid in enumerate(ids)]
    assert (await gw.post_json("/v2/feedback", [*feedback, {"label": 1}])).status == 400
    # Shadow copies and records complete in the background: wait for their series.
    deadline = time.monotonic() + 30
    while True:
        resp = await gw.session.get(gw.url + "/metrics")
        text = await resp.text()
        if ('understudy_agreement_total{' in text and 'route="price"' in text
                and 'outcome="written"' in text) or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.2)


def exported_families(text: str) -> dict[str, tuple[str, set[str] | None]]:
    """Family name as queried (counters with _total) -> (type, labels or None if no samples)."""
    families = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        families[name] = (family.type, labels if family.samples else None)
    # <counter|histogram>_created: prometheus_client's creation timestamps, not families of ours.
    return {n: v for n, v in families.items()
            if not (n.endswith("_created") and v[0] == "gauge"
                    and (n.removesuffix("_created") in families
                         or n.removesuffix("_created") + "_total" in families))}


def sample_names(families: dict[str, tuple[str, set[str] | None]]) -> dict[str, str]:
    """Every series name a query can use -> its family."""
    names = {}
    for family, (kind, _) in families.items():
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names.update({family + s: family for s in suffixes})
    return names


@pytest.mark.triton
async def test_rules_and_dashboard_use_only_exported_metrics(make_gateway: GatewayFactory,
                                                             monkeypatch, k8s_docs) -> None:
    families = exported_families(await scrape_busy_gateway(make_gateway, monkeypatch))
    # A family without samples yet (e.g. Kafka producer errors here) shows no labels: take them
    # from docs/METRICS.md, which the next test holds to the exported ones.
    documented = documented_families()
    families = {name: (kind, labels if labels is not None else documented.get(name, ("", None))[1])
                for name, (kind, labels) in families.items()}
    series = sample_names(families)
    known_labels = set(TARGET_LABELS) | {"le"}
    for _, labels in families.values():
        known_labels |= labels or set()
    recorded = recorded_names()
    pushed = pushed_names(k8s_docs)
    # The Pushgateway series carry the grouping labels and their own.
    known_labels |= {"route", "model", "verdict"}

    sources = [("rules", e) for e in rule_exprs()] + [("dashboard", e) for e in dashboard_exprs()]
    used: set[str] = set()
    for where, expr in sources:
        names, matchers, clause_labels = parse_promql(expr)
        assert names, f"{where}: no metric in {expr}"
        for name in names:
            assert name in series or name in recorded or (where == "rules" and name in pushed), (
                f"{where}: {name} is neither exported by the gateway nor recorded:\n{expr}")
            used.add(series.get(name, name))
        for metric, label in matchers:
            family_labels = families.get(series.get(metric, ""), ("", None))[1]
            if family_labels is not None:
                assert label in family_labels | {"le"}, f"{where}: {metric} has no {label}"
            else:
                assert label in known_labels, f"{where}: unknown label {label} in {expr}"
        assert clause_labels <= known_labels, f"{where}: {clause_labels - known_labels}"
    # The alerts and the dashboard cover the families the issue asks about.
    for family in ("understudy_requests_total", "understudy_gateway_overhead_seconds",
                   "understudy_shadow_copies_total", "understudy_log_records_total",
                   "understudy_prediction_score", "understudy_model_latency_seconds",
                   "understudy_agreement_total", "understudy_predicted_class_total",
                   "understudy_arm_selections_total", "understudy_kafka_connected",
                   "understudy_log_spill_bytes"):
        assert family in used, f"nothing uses {family}"


def documented_families() -> dict[str, tuple[str, set[str]]]:
    """Rows `| `name` | type | `label`, … | meaning |` of docs/METRICS.md."""
    rows = {}
    for line in METRICS_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[1] not in ("counter", "gauge", "histogram", "summary"):
            continue
        name = cells[0].strip("`")
        assert name not in rows, f"{name} documented twice"
        rows[name] = (cells[1], set(re.findall(r"`(\w+)`", cells[2])))
    return rows


@pytest.mark.triton
async def test_every_exported_family_is_documented(make_gateway: GatewayFactory,
                                                  monkeypatch) -> None:
    families = exported_families(await scrape_busy_gateway(make_gateway, monkeypatch))
    documented = documented_families()
    undocumented = sorted(set(families) - set(documented))
    assert not undocumented, f"exported but not in docs/METRICS.md: {undocumented}"
    for name, (kind, labels) in families.items():
        doc_kind, doc_labels = documented[name]
        assert doc_kind == kind, f"{name}: documented as {doc_kind}, exported as {kind}"
        if labels is not None:
            assert doc_labels == labels, f"{name}: documented labels {doc_labels}, got {labels}"
    stale = sorted(n for n in documented if n.startswith("understudy_") and n not in families)
    assert not stale, f"documented but not exported: {stale}"
