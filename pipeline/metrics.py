"""Prometheus metrics of the pipeline (prometheus-client), shared by both orchestrators.

Conventions: `selflengthen_` prefix, base units, `_total` counters, `_seconds` histograms. Labels are bounded:
run and namespace names, iteration numbers, stage names, roles, filter reasons — never texts or pod names.

Two kinds of series:
- process metrics (items, rejections, requests, tokens, words histograms, training steps) move while a stage runs
  and live as long as the process (a Job pod exposes them on /metrics while it runs);
- run metrics (phase, iteration, per-iteration average words, loss, scores) are set from the stage manifests by
  whoever orchestrates — the local runner or the operator — so finished iterations stay on the dashboard.
"""

from __future__ import annotations

import math
import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .stage_table import NAMES as STAGE_NAMES

WORD_BUCKETS = (50, 100, 200, 500, 1000, 2000, 4000, 8000, 16000, 32000)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
PHASES = ("Pending", "Serving", "Generating", "ScalingDown", "Training", "Evaluating", "Succeeded", "Failed",
          "Suspended")


class Metrics:
    """All series in one registry (the default one in production; a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.registry = registry
        self._last_stage: dict[tuple[str, str], tuple[str, str | None]] = {}
        stage = ["run", "iteration", "stage"]
        # -- data stages ----------------------------------------------------------------------------------------
        self.items = Counter("selflengthen_stage_items_total", "Items of a stage by outcome "
                             "(requested, accepted, failed, dropped_short)", [*stage, "outcome"], registry=registry)
        self.rejections = Counter("selflengthen_stage_rejections_total", "Rejected generation tries by filter reason",
                                  [*stage, "reason"], registry=registry)
        self.items_done = Gauge("selflengthen_stage_items_done", "Input items processed so far", stage,
                                registry=registry)
        self.items_planned = Gauge("selflengthen_stage_items_planned", "Input items of the stage", stage,
                                   registry=registry)
        self.words = Histogram("selflengthen_response_words", "Words of accepted responses (initial or extended)",
                               ["run", "iteration", "kind"], buckets=WORD_BUCKETS, registry=registry)
        self.stage_seconds = Histogram("selflengthen_stage_duration_seconds", "Wall time of finished stages",
                                       ["run", "stage"], buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 21600,
                                                                   86400), registry=registry)
        # -- inference client -----------------------------------------------------------------------------------
        client = ["run", "stage"]
        self.requests = Counter("selflengthen_inference_requests_total", "Inference HTTP requests by result "
                                "(ok, retried, failed)", [*client, "result"], registry=registry)
        self.request_seconds = Histogram("selflengthen_inference_request_duration_seconds",
                                         "Latency of successful inference requests", client,
                                         buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens = Counter("selflengthen_generated_tokens_total", "Completion tokens generated", client,
                              registry=registry)
        self.in_flight = Gauge("selflengthen_inference_requests_in_flight", "Inference requests in flight", client,
                               registry=registry)
        # -- training ----------------------------------------------------------------------------------------------
        train = ["run", "iteration", "role"]
        self.train_step = Gauge("selflengthen_training_step", "Optimizer steps done", train, registry=registry)
        self.train_steps = Gauge("selflengthen_training_steps_planned", "Optimizer steps planned", train,
                                 registry=registry)
        self.train_loss = Gauge("selflengthen_training_loss", "Training loss at the last logged step", train,
                                registry=registry)
        self.train_lr = Gauge("selflengthen_training_learning_rate", "Learning rate", train, registry=registry)
        self.train_tokens_rate = Gauge("selflengthen_training_tokens_per_second", "Training tokens per second",
                                       train, registry=registry)
        self.train_samples_rate = Gauge("selflengthen_training_samples_per_second", "Training samples per second",
                                        train, registry=registry)
        self.train_epoch = Gauge("selflengthen_training_epoch", "Epoch progress (fractional)", train,
                                 registry=registry)
        # -- run (set from manifests by the orchestrator) --------------------------------------------------------
        run = ["run", "namespace"]
        self.run_phase = Gauge("selflengthen_run_phase", "1 for the run's current phase", [*run, "phase"],
                               registry=registry)
        self.run_iteration = Gauge("selflengthen_run_iteration", "Current macro-iteration", run, registry=registry)
        self.run_iterations = Gauge("selflengthen_run_iterations", "Macro-iterations planned", run,
                                    registry=registry)
        self.run_stage = Gauge("selflengthen_run_stage", "1 for the stage running now", [*run, "stage"],
                               registry=registry)
        self.run_stage_started = Gauge("selflengthen_run_stage_started_timestamp_seconds", "When the current "
                                       "stage (or phase) of the run started", run, registry=registry)
        self.iteration_words = Gauge("selflengthen_iteration_average_words", "Average words of an iteration's "
                                     "accepted responses (kind: initial, extended)", [*run, "iteration", "kind"],
                                     registry=registry)
        self.iteration_accepted = Gauge("selflengthen_iteration_accepted_items", "Accepted items of a finished "
                                        "stage", [*run, "iteration", "stage"], registry=registry)
        self.iteration_requested = Gauge("selflengthen_iteration_requested_items", "Requested items of a "
                                         "finished stage", [*run, "iteration", "stage"], registry=registry)
        # finalLoss: the loss at the last logged step (not the mean over the training), locally and on a cluster
        self.iteration_loss = Gauge("selflengthen_iteration_training_loss", "Training loss at the last logged step of "
                                    "a finished training (the manifest's finalLoss)", [*run, "iteration", "role"],
                                    registry=registry)
        # -- orchestrators (operator or local runner) ---------------------------------------------------------
        self.stage_attempts = Counter("selflengthen_stage_attempts_total", "Stage attempts started (a Job, a "
                                      "server or a local call)", [*run, "stage"], registry=registry)
        self.stage_failures = Counter("selflengthen_stage_failures_total", "Failed stage attempts by reason",
                                      [*run, "stage", "reason"], registry=registry)
        self.reconcile_errors = Counter("selflengthen_operator_reconcile_errors_total", "Reconciliations that "
                                        "raised", ["namespace"], registry=registry)
        self.reconcile_seconds = Histogram("selflengthen_operator_reconcile_duration_seconds", "Reconcile latency",
                                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                           registry=registry)
        self.children_created = Counter("selflengthen_operator_children_created_total", "Child objects created by "
                                        "kind", ["namespace", "kind"], registry=registry)
        self.longen_score = Gauge("selflengthen_longen_score", "LonGen length-following score (type: about, range, "
                                  "above, below, overall)", [*run, "iteration", "type"], registry=registry)
        self.longbench_score = Gauge("selflengthen_longbench_write_score", "LongBench-Write score, 0-100 (score: sl "
                                     "length, sq quality)", [*run, "iteration", "score"], registry=registry)
        self.max_output_length = Gauge("selflengthen_max_output_length", "LongWrite-Ruler: the Generator's longest "
                                       "answer (LongWriter's length count)", [*run, "iteration"], registry=registry)

    # -- process metrics from a finished data stage's manifest ---------------------------------------------------

    def record_stage(self, run: str, iteration: int, stage: str, manifest: dict, rows=()) -> None:
        """Count a stage that has just finished in this process, from its manifest and its output rows."""
        labels = {"run": run, "iteration": str(iteration), "stage": stage}
        counts = manifest.get("counts", {})
        for outcome, key in (("requested", "requested"), ("accepted", "accepted"), ("failed", "failed"),
                             ("dropped_short", "droppedShort")):
            if isinstance(counts.get(key), int):
                self.items.labels(**labels, outcome=outcome).inc(counts[key])
        for reason, n in counts.get("rejected", {}).items():
            self.rejections.labels(**labels, reason=reason).inc(n)
        if "durationSeconds" in manifest:
            self.stage_seconds.labels(run=run, stage=stage).observe(manifest["durationSeconds"])
        for row in rows:
            if stage == "respond":
                self.words.labels(run=run, iteration=str(iteration), kind="initial").observe(row["words"])
            elif stage == "extend":
                self.words.labels(run=run, iteration=str(iteration), kind="extended").observe(row["words"])

    def client_observer(self, run: str, stage: str):
        """The InferenceClient's observe(event, value) hook, feeding the inference series of (run, stage)."""
        labels = {"run": run, "stage": stage}
        in_flight = self.in_flight.labels(**labels)
        latency = self.request_seconds.labels(**labels)
        tokens = self.tokens.labels(**labels)
        results = {r: self.requests.labels(**labels, result=r) for r in ("ok", "retried", "failed")}

        def observe(event: str, value: float) -> None:
            if event == "start":
                in_flight.inc()
            elif event == "end":
                in_flight.dec()
            elif event == "ok":
                results["ok"].inc()
                latency.observe(value)
            elif event == "retry":
                results["retried"].inc()
            elif event == "failed":
                results["failed"].inc()
            elif event == "tokens":
                tokens.inc(value)

        return observe

    # -- run metrics ---------------------------------------------------------------------------------------------

    def set_run(self, run: str, namespace: str, *, phase: str, iteration: int, iterations: int,
                stage: str | None) -> None:
        key = (run, namespace)
        if self._last_stage.get(key) != (phase, stage):
            self._last_stage[key] = (phase, stage)
            self.run_stage_started.labels(run=run, namespace=namespace).set(time.time())
        for p in PHASES:
            self.run_phase.labels(run=run, namespace=namespace, phase=p).set(1 if p == phase else 0)
        self.run_iteration.labels(run=run, namespace=namespace).set(iteration)
        self.run_iterations.labels(run=run, namespace=namespace).set(iterations)
        for s in STAGE_NAMES:
            self.run_stage.labels(run=run, namespace=namespace, stage=s).set(1 if s == stage else 0)

    def set_iteration(self, run: str, namespace: str, iteration: int, manifests: dict[str, dict]) -> None:
        """Per-iteration results from finished stages' manifests (they outlive the processes that made them): read
        from the store by the local runner, from the status records (which keep the same keys) by the operator."""
        labels = {"run": run, "namespace": namespace, "iteration": str(iteration)}
        for stage, manifest in manifests.items():
            counts = manifest.get("counts", {})
            if "accepted" in counts:
                self.iteration_accepted.labels(**labels, stage=stage).set(counts["accepted"])
                self.iteration_requested.labels(**labels, stage=stage).set(counts.get("requested", 0))
            if stage == "extend":
                self.iteration_words.labels(**labels, kind="initial").set(manifest.get("averageWordsInitial", 0))
                self.iteration_words.labels(**labels, kind="extended").set(manifest.get("averageWords", 0))
            if stage.startswith("train-") and _finite(manifest.get("finalLoss")):
                self.iteration_loss.labels(**labels, role=stage.removeprefix("train-")).set(manifest["finalLoss"])
            if stage in ("evaluate", "evaluate-length-following"):
                self._set_evaluation(labels if stage == "evaluate" else {**labels, "iteration": LENGTH_FOLLOWING},
                                     manifest)

    def _set_evaluation(self, labels: dict[str, str], manifest: dict) -> None:
        """LonGen, LongBench-Write and the ruler's maximum output length of one evaluation: an iteration's
        Generator, or the length-following model (iteration label `length-following`)."""
        scores = manifest.get("scores") or {}
        for kind, score in {"overall": scores.get("overall"), **(scores.get("byType") or {})}.items():
            if _finite(score):
                self.longen_score.labels(**labels, type=kind).set(score)
        lbw = manifest.get("longbenchWrite") or {}
        for kind in ("sl", "sq"):
            score = (lbw.get(kind) or {}).get("overall")
            if _finite(score):
                self.longbench_score.labels(**labels, score=kind).set(score)
        if _finite((manifest.get("ruler") or {}).get("maxLength")):
            self.max_output_length.labels(**labels).set(manifest["ruler"]["maxLength"])

    def forget_run(self, run: str, namespace: str) -> None:
        """Drop a deleted run's series so that they do not linger."""
        self._last_stage.pop((run, namespace), None)
        for metric in (self.run_phase, self.run_stage_started, self.run_iteration, self.run_iterations, self.run_stage,
                       self.iteration_words, self.iteration_accepted, self.iteration_requested, self.iteration_loss,
                       self.longen_score, self.longbench_score, self.max_output_length):
            for labels in [dict(zip(metric._labelnames, values, strict=True)) for values in list(metric._metrics)]:
                if labels.get("run") == run and labels.get("namespace") == namespace:
                    metric.remove(*labels.values())


LENGTH_FOLLOWING = "length-following"  # the iteration label of the length-following model's evaluation


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


_default: Metrics | None = None


def metrics() -> Metrics:
    """The process-wide metrics on the default registry (created on first use)."""
    global _default
    if _default is None:
        _default = Metrics()
    return _default


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Expose the default registry on http://addr:port/metrics (a daemon thread)."""
    start_http_server(port, addr=addr)
