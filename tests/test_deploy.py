"""Deployment files checked without Docker or a cluster: they parse, refer to each other
consistently, and the dashboard and alerts only use metrics the services really export."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.config import build_parser, env_name
from services.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"
GPU_STAGES = ("inversion", "keyframes", "propagation")
STAGES = (*GPU_STAGES, "editor")
GRPC_PORT = 50051
METRICS_PORT = 9090
#: The flags of `tokenflow serve` (from its parser); a typo in a manifest would only show up at deploy time.
SERVER_FLAGS = {o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")} - {
    "--help"
}
#: Kinds of the operators the manifests use (KEDA, Prometheus Operator): no schema offline, checked here.
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}
#: Series Prometheus makes itself for every target.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def load_all(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load(path: Path) -> Any:
    docs = load_all(path)
    assert len(docs) == 1, path
    return docs[0]


def flags(args: list[str]) -> dict[str, str]:
    """``--a=1 --b 2 --c`` -> {"--a": "1", "--b": "2", "--c": ""}; comments already stripped by YAML."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = str(args[i])
        assert arg.startswith("--"), f"unexpected positional argument {arg!r} in {args}"
        if "=" in arg:
            key, val = arg.split("=", 1)
        elif i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
            key, val = arg, str(args[i + 1])
            i += 1
        else:
            key, val = arg, ""
        out[key] = val.split("#", 1)[0].strip()
        i += 1
    return out


# --- everything parses ---------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 10
    for path in files:
        assert load_all(path), f"{path} is empty"


def test_dashboard_json_parses() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/tokenflow.json").read_text())
    assert dashboard["uid"] == "tokenflow" and dashboard["panels"]


# --- Kubernetes ----------------------------------------------------------------------------


@functools.cache
def kustomization() -> dict[str, Any]:
    return load(K8S / "kustomization.yaml")


@functools.cache
def k8s_objects() -> list[dict[str, Any]]:
    return [doc for name in kustomization()["resources"] for doc in load_all(K8S / name)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in k8s_objects() if o["kind"] == kind]


def containers(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from deployment["spec"]["template"]["spec"]["containers"]


@functools.cache
def config_data() -> dict[str, str]:
    """The generated ConfigMap's data (kustomize configMapGenerator from an env file)."""
    (generator,) = kustomization()["configMapGenerator"]
    data: dict[str, str] = {}
    for name in generator["envs"]:
        for line in (K8S / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, value = line.split("=", 1)
                data[key.strip()] = value.strip()
    return data


def configmap_names() -> set[str]:
    return {g["name"] for g in kustomization().get("configMapGenerator", [])} | {
        o["metadata"]["name"] for o in of_kind("ConfigMap")
    }


def deployment(name: str) -> dict[str, Any]:
    (found,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == name]
    return found


def test_kustomization_lists_exactly_the_manifests() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization lists missing {name}"
    on_disk = {p.name for p in [*K8S.glob("*.yaml"), *K8S.glob("*.yml")]} - {"kustomization.yaml"}
    assert on_disk == set(listed), f"not listed in kustomization: {on_disk - set(listed)}"
    assert kustomization()["namespace"] == "tokenflow"
    kinds = {o["kind"] for o in k8s_objects()}
    assert {"Namespace", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget"} <= kinds
    assert {"NetworkPolicy", *CRD_KINDS} <= kinds
    assert not of_kind("ConfigMap"), "ConfigMaps come from configMapGenerator (a content hash in the name)"


def test_one_deployment_and_service_per_stage() -> None:
    assert sorted(d["metadata"]["name"] for d in of_kind("Deployment")) == sorted(STAGES)
    assert sorted(s["metadata"]["name"] for s in of_kind("Service")) == sorted([*STAGES, "editor-pods"])


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def test_stage_services_are_headless_for_client_side_balancing() -> None:
    """A ClusterIP pins one HTTP/2 connection to one pod; headless DNS lists every ready pod."""
    for svc in of_kind("Service"):
        if component(svc) in GPU_STAGES or svc["metadata"]["name"] == "editor-pods":
            assert svc["spec"].get("clusterIP") == "None", svc["metadata"]["name"]


@pytest.mark.parametrize("stage", STAGES)
def test_deployment_is_production_ready(stage: str) -> None:
    dep = deployment(stage)
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert spec["terminationGracePeriodSeconds"] >= 300
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"].get("runAsUser", 1) != 0
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    for c in containers(dep):
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == ports["grpc"], f"{stage} {probe} must be a native gRPC probe"
        res = c["resources"]
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= res[section].keys(), f"{stage} {section}"
        gpus = res["limits"].get("nvidia.com/gpu")
        if stage in GPU_STAGES:
            assert gpus == 1 and res["requests"].get("nvidia.com/gpu", gpus) == gpus
        else:
            assert gpus is None
        assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False
        assert "preStop" in c.get("lifecycle", {})

        args = flags(c["args"])
        assert set(args) <= SERVER_FLAGS, set(args) - SERVER_FLAGS
        assert args["--services"] == stage
        assert args["--port"] == str(GRPC_PORT) and args["--metrics-port"] == str(METRICS_PORT)
        assert args["--cache-dir"] == "/cache" and args["--shared-store"] == "/shared"
        if stage in GPU_STAGES:
            assert args["--model"] and args["--device"]


@pytest.mark.parametrize("stage", STAGES)
def test_volumes_and_config_refs_exist(stage: str) -> None:
    spec = deployment(stage)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = {o["metadata"]["name"]: o for o in of_kind("PersistentVolumeClaim")}
    configmaps = configmap_names()
    for v in volumes.values():
        if "persistentVolumeClaim" in v:
            assert v["persistentVolumeClaim"]["claimName"] in claims
        if "configMap" in v:
            assert v["configMap"]["name"] in configmaps
    for c in containers(deployment(stage)):
        for ref in c.get("envFrom", []):
            assert ref["configMapRef"]["name"] in configmaps
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for m in mounts.values():
            assert m["name"] in volumes, f"{stage} mounts undefined volume {m['name']}"
        # Local diskcache on node-local disk, shared tier on the RWX claim (see deploy/README.md).
        assert "emptyDir" in volumes[mounts["/cache"]["name"]]
        shared = volumes[mounts["/shared"]["name"]]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in claims[shared]["spec"]["accessModes"]
        if stage in GPU_STAGES:
            assert mounts["/models"].get("readOnly") is True


def test_cache_size_fits_its_emptydir() -> None:
    """A diskcache larger than its emptyDir's sizeLimit gets the pod evicted when it fills up."""
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}

    def size(text: str) -> float:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i|[KMGT]B)", text.strip())
        assert m, text
        return float(m.group(1)) * units[m.group(2)]

    config = config_data()
    for stage in STAGES:
        spec = deployment(stage)["spec"]["template"]["spec"]
        (c,) = containers(deployment(stage))
        cache_size = flags(c["args"])["--cache-size"]
        cache_size = re.sub(r"\$\((\w+)\)", lambda m: config[m.group(1)], cache_size)
        volume = next(v for v in spec["volumes"] if v["name"] == "cache")
        assert size(cache_size) < size(volume["emptyDir"]["sizeLimit"]), stage


def test_args_only_reference_configmap_keys() -> None:
    config = config_data()
    # Every TOKENFLOW_* variable sets a `tokenflow serve` flag (the config reads them): no typos.
    flag_vars = {env_name(f) for f in SERVER_FLAGS}
    for key in config:
        assert not key.startswith("TOKENFLOW_") or key in flag_vars, key
    for dep in of_kind("Deployment"):
        for c in containers(dep):
            for ref in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
                assert ref in config, f"{dep['metadata']['name']} uses undefined $({ref})"


def test_services_select_their_deployments() -> None:
    for svc in of_kind("Service"):
        name = svc["metadata"]["name"]
        selector = svc["spec"]["selector"]
        matching = [
            d
            for d in of_kind("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert [d["metadata"]["name"] for d in matching] == [component(svc)], f"{name} selects {matching}"
        port_names = {p["name"] for c in containers(matching[0]) for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names
        expected = {GRPC_PORT} if name == "editor-pods" else {GRPC_PORT, METRICS_PORT}
        assert {p["port"] for p in svc["spec"]["ports"]} == expected


def test_editor_points_at_stage_services() -> None:
    (c,) = containers(deployment("editor"))
    args = flags(c["args"])
    for stage in GPU_STAGES:
        target = args[f"--{stage}-addr"]
        host = target.removeprefix("dns:///").rsplit(":", 1)
        assert host == [stage, str(GRPC_PORT)], target


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(rendered) == len(k8s_objects()) + 1  # + the generated ConfigMap
    assert all(d["metadata"].get("namespace") == "tokenflow" for d in rendered if d["kind"] != "Namespace")
    (configmap,) = [d for d in rendered if d["kind"] == "ConfigMap"]
    name = configmap["metadata"]["name"]
    assert re.fullmatch(r"tokenflow-config-[a-z0-9]{10}", name), name  # the content hash
    assert configmap["data"] == config_data()
    for dep in (d for d in rendered if d["kind"] == "Deployment"):
        refs = {r["configMapRef"]["name"] for c in containers(dep) for r in c.get("envFrom", [])}
        assert refs == {name}, dep["metadata"]["name"]
        (c,) = containers(dep)
        assert c["image"] == f"tokenflow-service:{kustomization()['images'][0]['newTag']}"


def test_manifests_match_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for obj in k8s_objects():
        if obj["kind"] not in CRD_KINDS:  # operators' kinds: structure checked below
            kv.validate(obj, "1.30.0", strict=True)


# --- fleet: rollouts, disruptions, autoscaling, monitoring, network policy ------------------


def test_images_are_pinned() -> None:
    (image,) = kustomization()["images"]
    tag = str(image.get("newTag", ""))
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag) or image.get("digest", "").startswith("sha256:"), image
    for dep in of_kind("Deployment"):
        for c in containers(dep):
            name, _, pinned = c["image"].partition(":")
            assert name == image["name"] and pinned == tag, c["image"]


@pytest.mark.parametrize("stage", STAGES)
def test_rollouts_never_lower_capacity(stage: str) -> None:
    strategy = deployment(stage)["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0 and strategy["rollingUpdate"]["maxSurge"] >= 1


def test_every_component_has_a_disruption_budget() -> None:
    budgets = {component(p): p for p in of_kind("PodDisruptionBudget")}
    assert set(budgets) == set(STAGES)
    for name, pdb in budgets.items():
        labels = deployment(name)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        replicas = deployment(name)["spec"].get("replicas", 1)
        if "minAvailable" in pdb["spec"]:
            assert pdb["spec"]["minAvailable"] < replicas, "a budget the pods can never meet blocks drains"
        else:
            assert pdb["spec"]["maxUnavailable"] >= 1


def test_gpu_stages_scale_on_their_queue_metric() -> None:
    exported = exported_sample_names(Metrics())
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in of_kind("ScaledObject")}
    assert set(scaled) == set(GPU_STAGES)
    for stage, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        ref = obj["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and deployment(stage)
        assert 1 <= obj["spec"]["minReplicaCount"] < obj["spec"]["maxReplicaCount"]
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http") and float(meta["threshold"]) > 0
        names = promql_metric_names(meta["query"])
        assert "tokenflow_jobs_queued" in names and names <= exported, names
        assert f'stage="{stage}"' in meta["query"]


@functools.cache
def prometheus_rule() -> dict[str, Any]:
    (rule,) = of_kind("PrometheusRule")
    return rule


def test_prometheus_rule_carries_the_alerts_and_the_service_monitor_their_labels() -> None:
    (monitor,) = of_kind("ServiceMonitor")
    rule = prometheus_rule()
    assert rule["metadata"]["labels"]["release"] == monitor["metadata"]["labels"]["release"]
    groups = {g["name"]: g for g in rule["spec"]["groups"]}
    for group in load(DEPLOY / "prometheus/rules.yml")["groups"]:
        assert groups[group["name"]] == group, "the PrometheusRule must carry rules.yml unchanged"
    # The scrape gives every series the labels the alerts select and print: job and component.
    services = [s for s in of_kind("Service") if "metrics" in {p["name"] for p in s["spec"]["ports"]}]
    assert {component(s) for s in services} == set(STAGES)
    for svc in services:
        assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert svc["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "tokenflow"  # up{job="tokenflow"}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    target_labels = {"job", "namespace", "pod", "instance"} | {
        r["targetLabel"] for r in endpoint["relabelings"]
    }
    exported = exported_sample_names(Metrics())
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            assert promql_metric_names(alert["expr"]) - PROMETHEUS_SYNTHETIC <= exported, alert["alert"]
            used = set(re.findall(r"\$labels\.(\w+)", json.dumps(alert["annotations"])))
            kept = set(re.findall(r"\bby \(([^)]*)\)", alert["expr"]))
            by = {label.strip() for group_by in kept for label in group_by.split(",")}
            assert used <= (by if by else target_labels), f"{alert['alert']} prints labels it drops: {used}"
    assert "TokenFlowModelNotReady" in {a["alert"] for g in rule["spec"]["groups"] for a in g["rules"]}


def test_only_the_editor_reaches_the_stages_and_only_monitoring_the_metrics() -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind("NetworkPolicy")}
    stages = policies["stages"]
    selected = {v for e in stages["podSelector"]["matchExpressions"] if e["key"].endswith("component")
                for v in e["values"]}  # fmt: skip
    assert selected == set(GPU_STAGES) and stages["policyTypes"] == ["Ingress"]
    by_port = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in stages["ingress"]}
    assert by_port[("grpc",)] == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "tokenflow",
                    "app.kubernetes.io/component": "editor",
                }
            }
        }
    ]
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert by_port[("metrics",)] == monitoring
    editor = policies["editor"]
    assert editor["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "editor"
    rules = {tuple(p["port"] for p in rule["ports"]): rule.get("from") for rule in editor["ingress"]}
    assert rules == {("grpc",): None, ("metrics",): monitoring}


# --- Compose -------------------------------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    return load(DEPLOY / "compose.yaml")


def test_compose_stages_share_cache_and_models() -> None:
    services = compose()["services"]
    assert set(STAGES) <= services.keys()
    assert "cache" in compose()["volumes"]
    for name in STAGES:
        svc = services[name]
        assert "cache:/cache" in svc["volumes"], f"{name} must mount the shared cache volume"
        args = flags(svc["command"])
        assert set(args) <= SERVER_FLAGS, set(args) - SERVER_FLAGS
        assert args["--services"] == name and args["--cache-dir"] == "/cache"
        assert args["--port"] == str(GRPC_PORT) and args["--metrics-port"] == str(METRICS_PORT)
        if name in GPU_STAGES:
            assert any(v.endswith(":/models:ro") for v in svc["volumes"])
            assert args["--model"].startswith("/models/")
            (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
            assert device["capabilities"] == ["gpu"]


def test_compose_editor_addresses_are_compose_services() -> None:
    services = compose()["services"]
    args = flags(services["editor"]["command"])
    for stage in GPU_STAGES:
        host, port = args[f"--{stage}-addr"].rsplit(":", 1)
        assert host == stage and host in services and port == str(GRPC_PORT)
    assert "gpu" not in json.dumps(services["editor"].get("deploy", {}))


def test_compose_mounted_files_exist() -> None:
    for svc in compose()["services"].values():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source


def test_prometheus_scrapes_every_service() -> None:
    config = load(DEPLOY / "prometheus/prometheus.yml")
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for stage in STAGES:
        assert f"{stage}:{METRICS_PORT}" in targets
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]


def test_grafana_provisioning_points_at_dashboards() -> None:
    datasource = load(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{METRICS_PORT}"
    provider = load(DEPLOY / "grafana/provisioning/dashboards/dashboards.yaml")["providers"][0]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts


# --- Dockerfile ----------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[str]:
    """One string per instruction: comments dropped, backslash continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = dockerfile_instructions(text)
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M)
    assert base and base.group(1).startswith("nvidia/cuda:") and "runtime" in base.group(1)
    assert any(ln.startswith("FROM ${CUDA_IMAGE}") for ln in lines)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users, "no USER"
    final_user = users[-1].split(":")[0]
    assert final_user not in {"root", "0"}
    assert "python3.11" in text and "pip install" in text and " ." in text
    assert 'ENTRYPOINT ["tokenflow", "serve"]' in lines
    cmd = next(ln for ln in lines if ln.startswith("CMD "))
    assert flags(json.loads(cmd[4:])) == {
        "--services": "all",
        "--host": "0.0.0.0",  # the container's interface: the server binds loopback by default
        "--port": str(GRPC_PORT),
        "--metrics-host": "0.0.0.0",
        "--metrics-port": str(METRICS_PORT),
        "--cache-dir": "/cache",
    }
    assert f"EXPOSE {GRPC_PORT} {METRICS_PORT}" in lines
    assert "VOLUME /cache" in lines
    assert "HF_HUB_OFFLINE=1" in text
    (healthcheck,) = [ln for ln in lines if ln.startswith("HEALTHCHECK ")]
    assert healthcheck.endswith('CMD ["tokenflow-client", "--target", "localhost:50051", "health"]')


# --- metric names --------------------------------------------------------------------------

_PROMQL_WORDS = set("and or unless bool offset by without on ignoring group_left group_right inf nan".split())


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords,
    label names (inside {...} or by/without(...)), ranges or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\$\{?\w+\}?", "", e)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", e):
        if m.group(2) is None and m.group(1).lower() not in _PROMQL_WORDS:
            names.add(m.group(1))
    return names


def exported_sample_names(metrics: Metrics) -> set[str]:
    """Every sample name the registry can export, even for labelled metrics with no children yet."""
    return set().union(*sample_names_by_family(metrics).values())


def sample_names_by_family(metrics: Metrics) -> dict[str, set[str]]:
    """Each metric family of the registry, with the sample names it can export."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "stateset": ("",),
        "unknown": ("",),
    }
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        names[family.name] = {family.name + s for s in suffixes.get(family.type, ("",))}
        names[family.name].update(s.name for s in family.samples)
    return names


def dashboard_exprs() -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                yield node["expr"]
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    return list(walk(json.loads((DEPLOY / "grafana/dashboards/tokenflow.json").read_text())))


def rule_exprs() -> list[str]:
    groups = load(DEPLOY / "prometheus/rules.yml")["groups"]
    return [rule["expr"] for g in groups for rule in g["rules"]]


def test_promql_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, service) (rate(foo_bucket{outcome="x"}[$__rate_interval])))'
        " / on (service) group_left bar_total offset 5m > 1e3 and up"
    )
    assert promql_metric_names(expr) == {"foo_bucket", "bar_total", "up"}


def test_dashboard_and_rules_use_only_exported_metrics() -> None:
    exported = exported_sample_names(Metrics())
    assert {
        "tokenflow_requests_total",
        "tokenflow_request_duration_seconds_bucket",
        "tokenflow_cache_bytes",
    } <= exported
    dashboard = dashboard_exprs()
    rules = rule_exprs()
    assert len(dashboard) >= 10 and len(rules) >= 3
    used: set[str] = set()
    for expr in dashboard:
        names = promql_metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"dashboard uses unknown {names - exported} in {expr!r}"
        used |= names
    for expr in rules:
        names = promql_metric_names(expr) - PROMETHEUS_SYNTHETIC
        assert names <= exported, f"rules use unknown {names - exported} in {expr!r}"
        used |= names
    # The dashboard covers what the design asks to watch.
    for needed in (
        "tokenflow_requests_total",
        "tokenflow_frames_processed_total",
        "tokenflow_request_duration_seconds_bucket",
        "tokenflow_job_duration_seconds_bucket",
        "tokenflow_jobs_queued",
        "tokenflow_jobs_in_flight",
        "tokenflow_cache_hits_total",
        "tokenflow_cache_misses_total",
        "tokenflow_accelerator_memory_bytes",
        "tokenflow_inversions_total",
    ):
        assert needed in used, needed
    # Every metric of ours has a panel: a new metric comes with the panel that shows it.
    on_dashboard = set().union(*(promql_metric_names(e) for e in dashboard))
    without_panel = {
        family
        for family, names in sample_names_by_family(Metrics()).items()
        if family.startswith("tokenflow_") and not names & on_dashboard
    }
    assert not without_panel, f"metrics without a dashboard panel: {sorted(without_panel)}"
    for q in ("0.5", "0.95", "0.99"):
        assert any(
            f"histogram_quantile({q}," in e and "tokenflow_job_duration_seconds_bucket" in e
            for e in dashboard
        )
