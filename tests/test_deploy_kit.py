"""The deploy kit: every file parses; the dashboard's PromQL is accepted by the real
Prometheus (promtool) and names only metrics the exporter has; the KubeRay
manifests, the cluster launcher, the scrape config and the image agree."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from blinkflow.config import load_config
from blinkflow.frame import Frame, FrameResult, Outcome
from blinkflow.metrics import PrometheusRecorder

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "blinkflow-dashboard.json"
PROMETHEUS_DIR = DEPLOY / "prometheus"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
JSON_FILES = sorted(DEPLOY.rglob("*.json"))
# Grafana's own variables, and what to put in their place for an offline syntax check
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def manifests() -> list[dict]:
    return [doc for path in sorted((DEPLOY / "kuberay").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest(kind: str, name: str) -> dict:
    found = [m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}"
    return found[0]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def offline_promql(expr: str) -> str:
    """Replace Grafana's variables: intervals by durations, the rest (used in =~ matchers) by '.*'."""
    for variable, duration in GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, duration)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def exported_sample_names() -> set[str]:
    from blinkflow.metrics import SINK_LEDGER

    """Every sample name the exporter produces once each kind of report has arrived."""
    recorder = PrometheusRecorder()
    recorder.on_stage_call("detect", 0.01, 4, 1)
    recorder.on_queue("detect", 1, 2)
    recorder.on_restart("detect")
    recorder.on_decoded(Frame("cam", 0, 0.0, image=None, meta={"reconnects": 1}))
    recorder.on_result(FrameResult("cam", 0, 0.0, 1, 1, Outcome.REUSED, results={
        "audit": {"agreement": 1.0}, "gate": {"decision": "reuse", "threshold": 0.01}}))
    recorder.on_device("host/cuda:0", "detect", 1, 2, 0.5)
    recorder.on_result(FrameResult("cam", 1, 0.1, 1, 1, Outcome.PROCESSED, results={
        "events": [{"type": "cross_line", "line": "gate", "direction": "in"}], "zones": {"door": 1}}))
    SINK_LEDGER.count_dropped("mqtt", "overflow", 0)  # the push sinks' series exist once a sink counted
    SINK_LEDGER.add_pending("mqtt", 0)
    return {sample.name for family in recorder.registry.collect() for sample in family.samples}


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_file_parses(path):
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert documents and all(isinstance(doc, dict) for doc in documents)


@pytest.mark.parametrize("path", JSON_FILES, ids=rel)
def test_json_file_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


@pytest.mark.parametrize("path", sorted((DEPLOY / "configs").glob("*.yaml")), ids=rel)
def test_deploy_pipeline_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.runtime.runner == "ray" and cfg.metrics.enabled and cfg.metrics.host == "0.0.0.0"


# --------------------------------------------------------------------------- dashboard and PromQL


def test_dashboard_has_the_panels_operators_need():
    titles = " | ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for topic in ("throughput per stage", "latency percentiles", "queue depth", "skip ratio", "audit agreement",
                  "gate decisions", "dropped", "failed", "streams up", "reconnects", "gpu memory", "objects per zone",
                  "line crossings", "push sink drops"):
        assert topic in titles, f"no dashboard panel about {topic!r}"


def test_every_panel_follows_the_selectors_at_the_top():
    """deploy/README.md: the job, stream and stage selectors filter every panel. Zones, crossings and events
    ignored the stream; with All jobs (".*") the readiness panel showed up{} of every job Prometheus scrapes."""
    import re

    from blinkflow.metrics import PrometheusRecorder

    per_stream = {name for name, labels in _families(PrometheusRecorder()) if "stream" in labels}
    for expr in dashboard_exprs():
        assert 'job=~"$job"' in expr, expr
        for name in re.findall(r"(blinkflow_[a-z_]+)", expr):
            base = re.sub(r"_(total|bucket|sum|count)$", "", name)
            assert base not in per_stream or 'stream=~"$stream"' in expr, expr
    job = next(v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == "job")
    assert job.get("allValue") in (None, ""), "All must be the Blinkflow jobs, not every job"


def _families(recorder) -> list[tuple[str, set[str]]]:
    return [(metric.name, set(getattr(collector, "_labelnames", ())))
            for collector in list(recorder.registry._collector_to_names) for metric in collector.describe()]


def test_dashboard_and_alerts_name_only_exported_metrics():
    exported = exported_sample_names()
    for expr in dashboard_exprs() + alert_exprs():
        for name in re.findall(r"\bblinkflow_[a-z0-9_]+", expr):
            assert name in exported, f"{name} (in {expr!r}) is not produced by pipeline/metrics.py"


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run installs it)")
    return binary


def test_every_dashboard_expr_is_valid_promql(promtool, tmp_path):
    """promtool checks recording rules offline, so each expression becomes one."""
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"blinkflow:dashboard_expr_{i}", "expr": offline_promql(expr)} for i, expr in enumerate(exprs)
    ]}]}
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    checked = subprocess.run([promtool, "check", "rules", str(tmp_path / "dashboard-rules.yml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout


def test_promtool_catches_a_broken_expression(promtool, tmp_path):
    """The check above would be worthless if promtool accepted anything."""
    rules = {"groups": [{"name": "broken", "rules": [{"record": "x:y", "expr": "sum by (stage (rate(x[1m]))"}]}]}
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(rules))
    checked = subprocess.run([promtool, "check", "rules", str(tmp_path / "broken.yml")], capture_output=True, timeout=60)
    assert checked.returncode != 0


def test_scrape_config_and_alerts_pass_promtool(promtool):
    checked = subprocess.run([promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
                             capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout and "rules found" in checked.stdout


def test_a_removed_camera_pages_no_one_and_a_dead_one_does(promtool, tmp_path):
    """The exporter drops a removed stream's stream_up at once (it held a 0 for two minutes, past the alert's
    one-minute for: a page for every camera removed on purpose); a stream that stays at 0 pages."""
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    series = 'blinkflow_stream_up{job="blinkflow-cameras",stream="%s"}'
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": [{"series": series % "removed", "values": "1 1 1 _x20"},
                         {"series": series % "dead", "values": "1 1 1 0x20"}],
        "alert_rule_test": [{"eval_time": "150s", "alertname": "BlinkflowStreamDown", "exp_alerts": [{
            "exp_labels": {"severity": "page", "job": "blinkflow-cameras", "stream": "dead"},
            "exp_annotations": {"summary": "Camera stream dead delivers no frames"}}]}]}]}
    (tmp_path / "alerts-test.yml").write_text(yaml.safe_dump(tests))
    checked = subprocess.run([promtool, "test", "rules", "alerts-test.yml"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --------------------------------------------------------------------------- KubeRay, launcher, image


def test_raycluster_has_cpu_and_gpu_worker_groups_running_the_same_image():
    cluster = manifest("RayCluster", "blinkflow")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    assert {c["image"] for t in templates for c in t["spec"]["containers"]} == {"blinkflow"}  # set by kustomize


def test_rayjobs_run_the_shipped_configs_on_the_cluster():
    mounted = {v["name"]: v for v in manifest("RayCluster", "blinkflow")["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert mounted["configs"]["configMap"]["name"] == "blinkflow-configs"
    for name, config in [("blinkflow-cameras", "camera.yaml"), ("blinkflow-archive", "archive.yaml")]:
        job = manifest("RayJob", name)["spec"]
        assert job["clusterSelector"] == {"ray.io/cluster": "blinkflow"}
        assert f"/etc/blinkflow/{config}" in job["entrypoint"] and (DEPLOY / "configs" / config).is_file()
    generated = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["configMapGenerator"][0]
    assert generated["name"] == "blinkflow-configs"


def test_metrics_ports_agree_across_configs_service_pod_and_scrape_config():
    ports = {load_config(p).metrics.port for p in (DEPLOY / "configs").glob("*.yaml")}
    service_ports = {p["port"] for p in manifest("Service", "blinkflow-metrics")["spec"]["ports"]}
    head = manifest("RayCluster", "blinkflow")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    pod_ports = {p["containerPort"] for p in head["ports"]}
    scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = {int(t.rsplit(":", 1)[1]) for job in scrape["scrape_configs"] for s in job["static_configs"] for t in s["targets"]}
    assert ports == service_ports == targets and ports <= pod_ports


def test_ray_version_matches_between_image_and_raycluster():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    image_ray = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)
    assert manifest("RayCluster", "blinkflow")["spec"]["rayVersion"] == image_ray


def test_dockerfile_installs_the_project_on_a_cuda_base():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+", dockerfile, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", dockerfile, re.M)
    assert "python3.11" in dockerfile and re.search(r"pip install \"/app\"", dockerfile)


def _torchvision_weights_named(configs: list[Path]) -> set[tuple[str, str]]:
    """(model, weights member) of every stage that names torchvision weights (not shipped, not a file)."""
    named = set()
    for config in configs:
        for stage in yaml.safe_load(config.read_text())["stages"].values():
            if stage.get("weights") not in (None, "shipped") and not str(stage["weights"]).endswith(".pt"):
                named.add((stage["model"], stage["weights"]))
    return named


def _prefetched(torchvision, names: list[str], model: str, member: str) -> bool:
    wanted = getattr(torchvision.models.get_model_weights(model), member)
    return any(torchvision.models.get_weight(n) == wanted for n in names)


def test_dockerfile_prefetches_the_torchvision_weights_the_configs_name():
    """Pods start offline: the deploy configs use the shipped weights (nothing to fetch), and the Dockerfile's
    documented PREFETCH_WEIGHTS example fetches what configs/coco-pretrained.yaml (torchvision's) names."""
    torchvision = pytest.importorskip("torchvision")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    shipped = re.search(r'^ARG PREFETCH_WEIGHTS="([^"]*)"', dockerfile, re.M).group(1).split()
    for model, member in _torchvision_weights_named(sorted((DEPLOY / "configs").glob("*.yaml"))):
        assert _prefetched(torchvision, shipped, model, member), (model, member)
    example = re.search(r'e\.g\.\n# --build-arg PREFETCH_WEIGHTS="([^"]*)"', dockerfile).group(1).split()
    named = _torchvision_weights_named([REPO_ROOT / "configs" / "coco-pretrained.yaml"])
    assert named, "configs/coco-pretrained.yaml names torchvision weights"
    for model, member in named:
        assert _prefetched(torchvision, example, model, member), (model, member)


def test_cluster_launcher_matches_rays_schema():
    ray = pytest.importorskip("ray")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    launcher = yaml.safe_load((DEPLOY / "cluster-launcher.yaml").read_text())
    jsonschema.validate(launcher, schema)
    assert {"head", "cpu_worker", "gpu_worker"} <= set(launcher["available_node_types"])
    assert launcher["file_mounts"]["/etc/blinkflow"] == "./deploy/configs"


def test_the_images_user_can_write_the_data_volume_on_both_routes():
    """The image runs as a non-root user; a fresh volume (or a /data Docker creates) is root's: the head pod's
    fsGroup and the launcher's first command hand /data to that user, or every run fails writing its records."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    uid = int(re.search(r"useradd .*--uid (\d+) (\w+)", dockerfile).group(1))
    assert re.search(r"^USER \w+", dockerfile, re.M)
    head = manifest("RayCluster", "blinkflow")["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["securityContext"]["fsGroup"] == uid
    assert any(m["mountPath"] == "/data" for c in head["containers"] for m in c["volumeMounts"])
    launcher = yaml.safe_load((DEPLOY / "cluster-launcher.yaml").read_text())
    assert "-v /data:/data" in launcher["docker"]["run_options"]
    assert any(f"chown {uid}:{uid} /data" in command for command in launcher["initialization_commands"])


def test_the_image_has_what_the_cluster_launcher_runs_inside_it():
    """ray up copies files into the container with rsync, and the head's autoscaler starts AWS workers (boto3)
    and reaches them over ssh, all from inside the image."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    apt = " ".join(re.findall(r"apt-get install [^&]*", dockerfile))
    assert "rsync" in apt.split() and "openssh-client" in apt.split()
    assert re.search(r"pip install [^\n]*\bboto3\b", dockerfile)
    assert yaml.safe_load((DEPLOY / "cluster-launcher.yaml").read_text())["provider"]["type"] == "aws"


def test_the_build_context_leaves_out_local_build_and_run_outputs():
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {"build", "dist", "runs", "tools/wheels", "tests", ".git"} <= set(ignored)


@pytest.fixture(scope="module")
def kubectl() -> str:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl is not installed")
    return binary


@pytest.fixture(scope="module")
def rendered(kubectl, tmp_path_factory) -> Path:
    """The kustomization rendered offline, as `kubectl apply -k deploy/` would send it."""
    built = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    path = tmp_path_factory.mktemp("kustomize") / "all.yaml"
    path.write_text(built.stdout)
    return path


def test_kustomization_sets_the_image_everywhere(rendered):
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    images = set(re.findall(r"^\s*(?:- )?image: (\S+)$", rendered.read_text(), re.M))
    assert images == {"registry.example.com/blinkflow:0.1.0"}
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "RayCluster", "RayJob", "Service", "PersistentVolumeClaim"}
    assert all(d["metadata"].get("namespace") == "blinkflow" for d in docs if d["kind"] != "Namespace")


def test_every_container_uses_the_image_name_the_kustomization_rewrites():
    """Without kubectl (CI has none): kustomize's image transformer rewrites containers whose image is an
    `images[].name`, so every container of the kustomization's resources must use that name, and the RayJobs
    must run on the cluster (clusterSelector), not in pods of their own with another image."""
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    names = {image["name"] for image in kustomization["images"]}
    resources = [doc for path in kustomization["resources"] for doc in yaml.safe_load_all((DEPLOY / path).read_text())
                 if doc]
    images = [c["image"] for doc in resources for c in _containers(doc)]
    assert len(images) == 3 and set(images) <= names, images  # head, cpu and gpu workers
    for job in [m for m in manifests() if m["kind"] == "RayJob"]:  # the archive job is applied on its own
        assert job["spec"]["clusterSelector"] and not _containers(job), job["metadata"]["name"]
    assert {d["kind"] for d in resources} >= {"Namespace", "RayCluster", "RayJob", "Service", "PersistentVolumeClaim"}


def _containers(node: object) -> list[dict]:
    """Every container spec anywhere under a manifest."""
    if isinstance(node, dict):
        found = [c for c in node.get("containers", []) if isinstance(c, dict)]
        return found + [c for key, value in node.items() if key != "containers" for c in _containers(value)]
    if isinstance(node, list):
        return [c for item in node for c in _containers(item)]
    return []
