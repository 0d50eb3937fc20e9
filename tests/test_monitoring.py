"""The dashboard and the Prometheus rules: generated files in sync, rules checked and unit-tested by promtool,
and every dashboard query answered by a real Prometheus scraping a real local run and a real vLLM server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from selflengthen.operator import monitoring
from selflengthen.pipeline.config import parse_config
from selflengthen.pipeline.metrics import Metrics
from selflengthen.pipeline.runner import RunMetrics, run_local
from selflengthen.pipeline.serving import free_port
from selflengthen.pipeline.stages import StageContext, StageError, run_stage
from selflengthen.pipeline.store import open_store

CHART = Path(__file__).resolve().parents[1] / "charts" / "selflengthen"
RULES = CHART / "rules" / "selflengthen.rules.yaml"
RULE_TESTS = CHART / "rules" / "selflengthen.rules.test.yaml"
DASHBOARD = CHART / "dashboards" / "selflengthen.json"


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (make tools installs the Debian prometheus package)")
    return binary


def test_checked_in_files_are_generated(tmp_path):
    written = monitoring.write(tmp_path)
    assert [p.read_text() for p in written] == [DASHBOARD.read_text(), RULES.read_text()], \
        "charts/selflengthen is stale: run `selflengthen generate`"


def test_rules_pass_promtool_check():
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(monitoring.RECORDING_RULES) + len(monitoring.ALERTS)} rules found" in out.stdout


def test_every_alert_has_promtool_unit_tests():
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", [])}
    assert tested == {alert[0] for alert in monitoring.ALERTS}
    out = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], capture_output=True, text=True,
                         cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) == len(monitoring.PANELS)
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "run"} <= names


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def metric_names_in(expr: str) -> set[str]:
    """Metric names a query reads (identifiers before a selector or range that are not functions/keywords)."""
    names = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{|\[)", expr))
    recorded = {name for name, _ in monitoring.RECORDING_RULES}
    return {n for n in names if n not in recorded and (n.startswith(("selflengthen_", "vllm:")))} | \
        {n for n in names if n in recorded}


@pytest.mark.vllm
def test_dashboard_is_backed_by_real_series(prometheus, vllm_endpoint, tmp_path):
    """A whole local iteration (data, training, evaluation on adapters) with a failed attempt first, scraped with
    vLLM by a real Prometheus: every panel query runs without error and every metric it reads has series; the
    values match the run's manifests."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    vllm_host = vllm_endpoint.removeprefix("http://").removesuffix("/v1")
    prom = prometheus({"selflengthen": [f"127.0.0.1:{port}"], "vllm": [vllm_host]}, rule_files=[RULES])
    try:
        config = parse_config({
            "name": "dash", "iterations": 1, "seed": 3,
            "models": {"endpoint": vllm_endpoint},
            "sampling": {"maxTokens": 48},
            "selfInstruct": {"instructionsPerIteration": 8, "maxTries": 3, "maxTokens": 40, "judge": False},
            "respond": {"maxRetries": 2},
            "extend": {"attempts": 1, "passes": 1, "maxRetries": 1, "maxTokens": 96},
            "filters": {"checkEnding": False, "checkMeta": False},
            "storage": {"uri": f"file://{tmp_path}", "shardSize": 4},
            "training": {"maxSteps": 2, "cutoffTokens": 512},
            "evaluate": {"items": 4, "maxTokens": 32, "longbenchWrite": {"items": 2}, "ruler": {"items": 2}},
            "local": {"startupTimeoutSeconds": 600},
        })
        # A failed attempt first (respond before its input exists), as the failures panel needs one.
        ctx = StageContext(config=config, iteration=1, store=open_store(config.storage.uri), metrics=metrics)
        with pytest.raises(StageError):
            RunMetrics(metrics, config).attempt("respond", lambda: run_stage("respond", ctx))
        results = run_local(config, progress=False, metrics=metrics)[1]
        # The last thing a run sets is its phase: once Prometheus has it, it has scraped everything else.
        assert prom.wait_until(lambda: prom.query('selflengthen_run_phase{run="dash",phase="Succeeded"} == 1'),
                               timeout=60)
        expected = results["extend"]["averageWords"]
        words = prom.wait_until(lambda: prom.query(
            'selflengthen_iteration_average_words{run="dash",kind="extended"}'), timeout=60)
        assert words and float(words[0]["value"][1]) == pytest.approx(expected)
        # Recording rules are evaluated every second; wait for the last one to have data.
        assert prom.wait_until(lambda: prom.query('selflengthen:stage_acceptance:ratio{run="dash"}'), timeout=60)
        assert prom.wait_until(lambda: prom.query('selflengthen:generated_tokens:rate1m{run="dash"}'), timeout=60)

        known = prom.metric_names()
        for title, expr in dashboard_queries():
            concrete = expr.replace("$run", "dash").replace("$__rate_interval", "1m")
            prom.query(concrete)  # raises with Prometheus's error when a query does not parse or evaluate
            missing = metric_names_in(expr) - known
            assert not missing, f"panel {title!r} reads metrics with no series: {missing}"

        accepted = prom.query('selflengthen_stage_items_total{run="dash",stage="respond",outcome="accepted"}')
        assert float(accepted[0]["value"][1]) == results["respond"]["counts"]["accepted"]
        failures = prom.query('selflengthen_stage_failures_total{run="dash"}')
        assert failures and failures[0]["metric"]["reason"] == "StageError"
        phase = prom.query('selflengthen_run_phase{run="dash"} == 1')
        assert [p["metric"]["phase"] for p in phase] == ["Succeeded"]
        loss = prom.query('selflengthen_iteration_training_loss{run="dash",role="generator"}')
        assert float(loss[0]["value"][1]) == pytest.approx(results["train-generator"]["finalLoss"])
        score = prom.query('selflengthen_longen_score{run="dash",type="overall"}')
        assert float(score[0]["value"][1]) == pytest.approx(results["evaluate"]["scores"]["overall"])
        # LongBench-Write's S_l and the ruler's maximum output length, beside LonGen
        sl = prom.query('selflengthen_longbench_write_score{run="dash",score="sl"}')
        assert float(sl[0]["value"][1]) == pytest.approx(results["evaluate"]["longbenchWrite"]["sl"]["overall"])
        longest = prom.query('selflengthen_max_output_length{run="dash"}')
        assert float(longest[0]["value"][1]) == results["evaluate"]["ruler"]["maxLength"]
    finally:
        server.shutdown()
