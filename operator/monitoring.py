"""The Grafana dashboard and the Prometheus rules of a Self-Lengthen installation, generated from code.

The checked-in copies in charts/selflengthen/ (dashboards/selflengthen.json, rules/selflengthen.rules.yaml) are
written by `selflengthen generate`; a test fails when they drift from what this module makes, and every panel
query is run against a real Prometheus in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

RUN = 'run=~"$run"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Recording rules: the dashboard's heavier queries, evaluated once by Prometheus.
RECORDING_RULES = [
    ("selflengthen:generated_tokens:rate1m", "sum by (run, stage) (rate(selflengthen_generated_tokens_total[1m]))"),
    ("selflengthen:inference_requests:rate1m",
     "sum by (run, stage, result) (rate(selflengthen_inference_requests_total[1m]))"),
    ("selflengthen:inference_latency_seconds:p95_5m",
     "histogram_quantile(0.95, sum by (run, stage, le) "
     "(rate(selflengthen_inference_request_duration_seconds_bucket[5m])))"),
    ("selflengthen:stage_acceptance:ratio",
     "selflengthen_iteration_accepted_items / (selflengthen_iteration_requested_items > 0)"),
]

# Alerts: (name, expr, for, severity, summary, description).
ALERTS = [
    ("SelfLengthenRunFailed", 'selflengthen_run_phase{phase="Failed"} == 1', "0m", "critical",
     "Self-Lengthen run {{ $labels.namespace }}/{{ $labels.run }} failed",
     "The run stopped; `kubectl describe slr {{ $labels.run }}` shows the reason in its status and events."),
    ("SelfLengthenStageStuck",
     "time() - selflengthen_run_stage_started_timestamp_seconds > 6 * 3600 "
     'and on (run, namespace) selflengthen_run_phase{phase=~"Serving|Generating|Training|Evaluating"} == 1',
     "10m", "warning",
     "Stage of {{ $labels.namespace }}/{{ $labels.run }} running for more than 6 hours",
     "One stage of the run has not finished in 6 hours; check its pods and the inference server."),
    ("SelfLengthenNoProgress",
     'sum by (run, stage) (changes(selflengthen_stage_items_done[30m])) == 0 '
     'and count by (run, stage) (selflengthen_stage_items_done < selflengthen_stage_items_planned) '
     # the stage has been running for the whole window (a stage that just started is not stuck)
     'and count by (run, stage) (selflengthen_stage_items_done offset 30m)',
     "0m", "warning",
     "No progress in stage {{ $labels.stage }} of {{ $labels.run }} for 30 minutes",
     "No item of the stage finished in 30 minutes; the inference server may be down or overloaded."),
    ("SelfLengthenInferenceDown", 'up{job=~".*vllm.*"} == 0', "5m", "critical",
     "vLLM server {{ $labels.instance }} is down",
     "Prometheus cannot scrape the inference server; data stages will stall and then fail past their deadline."),
    ("SelfLengthenTrainingLossNaN", "selflengthen_training_loss != selflengthen_training_loss", "0m", "critical",
     "Training loss of {{ $labels.run }} ({{ $labels.role }}) is NaN",
     "Training diverged; lower the learning rate or check the SFT data of this iteration."),
]


def rules() -> dict:
    """A Prometheus rule file (the chart wraps its groups into a PrometheusRule)."""
    return {
        "groups": [
            {"name": "selflengthen.recording", "rules": [{"record": r, "expr": e} for r, e in RECORDING_RULES]},
            {"name": "selflengthen.alerts", "rules": [
                {"alert": name, "expr": expr, "for": duration, "labels": {"severity": severity},
                 "annotations": {"summary": summary, "description": description}}
                for name, expr, duration, severity, summary, description in ALERTS
            ]},
        ]
    }


# Panels: (title, type, [(expr, legend)], grid width, unit, extra options).
PANELS = [
    ("Phase", "stat", [(f'max by (phase) (selflengthen_run_phase{{{RUN}}}) == 1', "{{phase}}")], 6, "none",
     {"textMode": "name"}),
    ("Iteration", "stat", [(f"max(selflengthen_run_iteration{{{RUN}}})", "current"),
                           (f"max(selflengthen_run_iterations{{{RUN}}})", "of")], 6, "none", {}),
    ("Stage", "state-timeline", [(f"max by (stage) (selflengthen_run_stage{{{RUN}}})", "{{stage}}")], 12, "none",
     {}),
    ("Average words per iteration (initial vs extended)", "barchart",
     [(f"max by (iteration, kind) (selflengthen_iteration_average_words{{{RUN}}})", "{{kind}} {{iteration}}")],
     12, "none", {"instant": True}),
    ("Acceptance per stage", "bargauge",
     [(f"max by (stage, iteration) (selflengthen:stage_acceptance:ratio{{{RUN}}})", "{{stage}} it{{iteration}}")],
     12, "percentunit", {"instant": True}),
    ("Stage progress", "timeseries",
     [(f"sum by (stage) (selflengthen_stage_items_done{{{RUN}}}) / "
       f"sum by (stage) (selflengthen_stage_items_planned{{{RUN}}})", "{{stage}}")], 12, "percentunit", {}),
    ("Rejections by reason", "timeseries",
     [(f"sum by (stage, reason) (increase(selflengthen_stage_rejections_total{{{RUN}}}[$__rate_interval]))",
       "{{stage}} {{reason}}")], 12, "none", {}),
    ("Generated tokens/s", "timeseries",
     [(f"sum by (stage) (selflengthen:generated_tokens:rate1m{{{RUN}}})", "pipeline {{stage}}"),
      ("sum(rate(vllm:generation_tokens_total[1m]))", "vLLM (all clients)")], 12, "short", {}),
    ("Inference latency p95", "timeseries",
     [(f"max by (stage) (selflengthen:inference_latency_seconds:p95_5m{{{RUN}}})", "pipeline {{stage}}"),
      ("histogram_quantile(0.95, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket[5m])))", "vLLM e2e")],
     12, "s", {}),
    ("Inference requests", "timeseries",
     [(f"sum by (result) (selflengthen:inference_requests:rate1m{{{RUN}}})", "{{result}}"),
      (f"sum(selflengthen_inference_requests_in_flight{{{RUN}}})", "in flight")], 12, "reqps", {}),
    ("Training loss", "timeseries",
     [(f"max by (role, iteration) (selflengthen_training_loss{{{RUN}}})", "{{role}} it{{iteration}}"),
      (f"max by (role, iteration) (selflengthen_iteration_training_loss{{{RUN}}})", "final {{role}} it{{iteration}}")],
     12, "none", {}),
    ("Training throughput", "timeseries",
     [(f"sum by (role) (selflengthen_training_tokens_per_second{{{RUN}}})", "{{role}} tokens/s"),
      (f"max by (role) (selflengthen_training_step{{{RUN}}}) / "
       f"max by (role) (selflengthen_training_steps_planned{{{RUN}}})", "{{role}} progress")], 12, "short", {}),
    ("LonGen length-following score", "barchart",
     [(f"max by (iteration, type) (selflengthen_longen_score{{{RUN}}})", "{{type}} it{{iteration}}")], 12, "none",
     {"instant": True}),
    ("LongBench-Write S_l and S_q per iteration", "barchart",
     [(f"max by (iteration, score) (selflengthen_longbench_write_score{{{RUN}}})", "{{score}} it{{iteration}}")],
     12, "none", {"instant": True}),
    ("Maximum output length per iteration (LongWrite-Ruler)", "barchart",
     [(f"max by (iteration) (selflengthen_max_output_length{{{RUN}}})", "it{{iteration}}")], 12, "none",
     {"instant": True}),
    ("Failures", "timeseries",
     [(f"sum by (stage, reason) (increase(selflengthen_stage_failures_total{{{RUN}}}[1h]))",
       "{{stage}} {{reason}}"),
      (f'sum by (stage) (increase(selflengthen_inference_requests_total{{{RUN},result="failed"}}[1h]))',
       "inference {{stage}}")], 12, "none", {}),
]


def dashboard() -> dict:
    panels, x, y = [], 0, 0
    for index, (title, kind, queries, width, unit, options) in enumerate(PANELS, start=1):
        if x + width > 24:
            x, y = 0, y + 8
        targets = [
            {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i),
             "instant": bool(options.get("instant")), "range": not options.get("instant")}
            for i, (expr, legend) in enumerate(queries)
        ]
        panel = {
            "id": index, "title": title, "type": kind, "datasource": DATASOURCE, "targets": targets,
            "gridPos": {"x": x, "y": y, "w": width, "h": 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {k: v for k, v in options.items() if k != "instant"},
        }
        panels.append(panel)
        x += width
    return {
        "uid": "selflengthen-runs",
        "title": "Self-Lengthen runs",
        "tags": ["selflengthen"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-24h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {"name": "run", "type": "query", "datasource": DATASOURCE, "label": "Run", "multi": True,
             "includeAll": True, "refresh": 2, "query": {"query": "label_values(selflengthen_run_iteration, run)",
                                                          "refId": "run"}},
        ]},
        "panels": panels,
    }


def write(chart_dir: Path) -> list[Path]:
    """Write the dashboard and rules into the chart; returns the paths written."""
    dash = chart_dir / "dashboards" / "selflengthen.json"
    rule_file = chart_dir / "rules" / "selflengthen.rules.yaml"
    dash.parent.mkdir(parents=True, exist_ok=True)
    rule_file.parent.mkdir(parents=True, exist_ok=True)
    dash.write_text(json.dumps(dashboard(), indent=2) + "\n")
    header = "# Generated by `selflengthen generate` from selflengthen/operator/monitoring.py: do not edit.\n"
    rule_file.write_text(header + yaml.safe_dump(rules(), sort_keys=False, width=120))
    return [dash, rule_file]
