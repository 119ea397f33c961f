"""The Grafana dashboard and the Prometheus scrape config in deploy/observability/ match the code.

Every metric a panel queries must be one the code registers (a renamed metric fails here, not
on an operator's empty graph), and the scrape config must read the runners' targets from the
file the orchestrator writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from secure_runner import metrics as server_metrics
from secure_runner.client.metrics import ClientMetrics
from secure_runner.orchestrator.local import LocalOrchestratorSettings

OBSERVABILITY = Path(__file__).resolve().parent.parent / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
SCRAPE_CONFIG = OBSERVABILITY / "prometheus.yml"

# The names a family of each type is queried by (prometheus-client's exposition).
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created", ""),
    "info": ("_info",),
    "unknown": ("",),
}
# What a PromQL expression queries: an identifier of one of the families the processes expose.
METRIC_NAME = re.compile(r"\b((?:secure_runner|process|python)_[a-zA-Z0-9_]+)\b")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def _registered_sample_names() -> set[str]:
    """Every sample name the orchestrator, a runner and the coordinator's helper can expose."""
    registries = [
        server_metrics.RunnerMetrics({}).registry,
        server_metrics.OrchestratorMetrics(lambda: (), ("RUNNING",)).registry,
        ClientMetrics().registry,
        ClientMetrics(registry=CollectorRegistry()).registry,  # mounted in a registry of the coordinator's
    ]
    names = set()
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type])
    return names


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", ()))  # a collapsed row holds its panels
    return panels


def _family(sample_name: str) -> str:
    return re.sub(r"_(bucket|count|sum|total|created)$", "", sample_name)


def _metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(QUOTED.sub('""', expr)))  # label values are never metric names


def test_every_panel_queries_only_metrics_the_code_registers():
    dashboard = json.loads(DASHBOARD.read_text())
    registered = _registered_sample_names()
    queried: dict[str, set[str]] = {}
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = _metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: no metric in {target['expr']!r}"
            queried[panel["title"]] = queried.get(panel["title"], set()) | names
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queried[f"variable {variable['name']}"] = _metric_names(variable["query"]["query"])
    unknown = {title: sorted(names - registered) for title, names in queried.items() if names - registered}
    assert unknown == {}
    # Every metric of the contract has a panel (the standard process_* / python_* families need not).
    contract = {_family(name) for name in registered if name.startswith("secure_runner_")}
    shown = {_family(name) for names in queried.values() for name in names}
    assert sorted(contract - shown) == []


def test_the_check_catches_a_renamed_metric():
    registered = _registered_sample_names()
    expr = 'sum by (reason) (rate(secure_runner_client_call_total{outcome!="SUCCESS"}[5m]))'  # "calls" renamed
    assert _metric_names(expr) - registered == {"secure_runner_client_call_total"}
    assert "secure_runner_client_calls_total" in registered
    assert "secure_runner_client_call_seconds_bucket" in registered and "secure_runner_client_call_seconds" not in registered


def test_panels_do_not_overlap():
    cells = set()
    for panel in _panels(json.loads(DASHBOARD.read_text())):
        grid = panel["gridPos"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert grid["x"] + grid["w"] <= 24 and not cells & mine, panel["title"]
        cells |= mine


def test_the_scrape_config_reads_the_runners_from_the_orchestrators_file():
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"secure-runner-orchestrator", "secure-runner-runners", "secure-runner-coordinator"}
    # Both server jobs read the file an orchestrator started with `--pki /var/lib/secure-runner/pki` writes.
    settings = LocalOrchestratorSettings(
        crunch_id="my-crunch", submissions=Path("/srv/submissions"), pki_dir=Path("/var/lib/secure-runner/pki")
    )
    for name, role in (("secure-runner-orchestrator", "orchestrator"), ("secure-runner-runners", "runner")):
        (file_sd,) = jobs[name]["file_sd_configs"]
        assert file_sd["files"] == [str(settings.metrics_targets)]
        (keep,) = jobs[name]["relabel_configs"]
        assert (keep["source_labels"], keep["regex"], keep["action"]) == (["role"], role, "keep")
    assert jobs["secure-runner-coordinator"]["static_configs"] == [{"targets": ["127.0.0.1:9095"]}]
