"""The local orchestrator: runs every stage of every macro-iteration on this machine.

It decides what to do next from the store's completion markers only, so a killed run, started again, resumes
at the first unfinished stage. When the configuration names no inference endpoint it starts a vLLM server as
a subprocess (the local stand-in for the operator's inference Deployment; with full fine-tuning one a model the
stage asks) and stops it on exit or Ctrl-C.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import stage_table
from .config import BASE_MODEL_NAME, RunConfig
from .identity import claim
from .metrics import Metrics
from .metrics import metrics as default_metrics
from .models import conversion_pending, resolve_model
from .progress import Progress
from .report import read_markdown, refresh_report
from .serving import VLLMServer
from .stages import StageContext, iteration_stages, run_stage
from .store import Store, open_store
from .tinymodel import TINY_URI, ensure_tiny_model, tiny_model_cached

log = logging.getLogger("selflengthen.runner")


def phase_of(stage: str) -> str:
    return stage_table.stage(stage).phase


def roles_of(config: RunConfig, stage: str) -> tuple[str, ...]:
    """The served models a stage asks (pipeline/stage_table.py); collect without its extension asks only the
    Generator."""
    if stage == "collect" and not config.collect.extend:
        return ("generator",)
    return stage_table.stage(stage).roles


@dataclass(frozen=True)
class ServerSpec:
    """What one vLLM server serves: a model under some names, plus LoRA adapters by name."""

    model: str
    names: tuple[str, ...]
    lora: tuple[tuple[str, str], ...] = ()


def server_specs(config: RunConfig, store: Store, stage: str, iteration: int, workdir: Path) -> tuple[ServerSpec, ...]:
    """The servers a generating stage needs. LoRA: one, the base model plus both roles' adapters (vLLM
    --enable-lora); full fine-tuning: one a model the stage asks (vLLM serves one model a process), each role's
    own trained weights under its name and the base model's under its own (collect asks the Generator and the
    Extender: two servers, the client routes by model name)."""
    from .training import LENGTH_FOLLOWING, fetch_trained_model

    models, served = config.models, stage_table.stage(stage).models
    if served == "length-following":  # the length-following model under the Generator's name
        trained = fetch_trained_model(config, store, iteration, LENGTH_FOLLOWING, workdir)
        if trained.mode == "lora":
            return (ServerSpec(resolve_model(models.base), ("base",),
                               ((models.generator, str(trained.path.resolve())),)),)
        return (ServerSpec(str(trained.path.resolve()), (models.generator,)),)
    model_iteration = iteration if served == "current" else iteration - 1
    if model_iteration == 0:
        return (ServerSpec(resolve_model(models.base), (models.generator, models.extender, BASE_MODEL_NAME)),)
    if config.training.mode == "lora":
        adapters = tuple(
            (getattr(models, role),
             str(fetch_trained_model(config, store, model_iteration, role, workdir).path.resolve()))
            for role in ("generator", "extender")
        )
        return (ServerSpec(resolve_model(models.base), (BASE_MODEL_NAME,), adapters),)
    specs = []
    for role in roles_of(config, stage):
        if role == "base":  # the base model's own weights, under its own name
            specs.append(ServerSpec(resolve_model(models.base), (BASE_MODEL_NAME,)))
        else:
            trained = fetch_trained_model(config, store, model_iteration, role, workdir)
            specs.append(ServerSpec(str(trained.path.resolve()), (getattr(models, role),)))
    return tuple(specs)


class Endpoints:
    """The inference servers of the stage at hand: the configured endpoint, or local vLLM servers started for the
    models the stage needs (restarted only when they change; stopped for training and on exit). `endpoint` is the
    first server's; `routes` maps the served names of the others to theirs (full fine-tuning, collect)."""

    def __init__(self, config: RunConfig, store: Store, workdir: Path):
        self.config, self.store, self.workdir = config, store, workdir
        self.specs: tuple[ServerSpec, ...] = ()
        self.servers: list[VLLMServer] = []
        self.routes: dict[str, str] = {}
        self.progress = Progress(False)

    @property
    def server(self) -> VLLMServer | None:
        return self.servers[0] if self.servers else None

    def for_stage(self, stage: str, iteration: int) -> str:
        if self.config.models.endpoint:
            return self.config.models.endpoint
        specs = server_specs(self.config, self.store, stage, iteration, self.workdir)
        if specs != self.specs:
            self.stop()
            for i, spec in enumerate(specs):
                self.servers.append(self.start(spec, self.config.local.port if i == 0 else 0))
            self.specs = specs
            self.routes = {name: server.endpoint for spec, server in zip(specs[1:], self.servers[1:], strict=True)
                           for name in spec.names}
        return self.servers[0].endpoint

    def start(self, spec: ServerSpec, port: int) -> VLLMServer:
        local = self.config.local
        server = VLLMServer(
            spec.model, served_names=list(spec.names), lora_modules=dict(spec.lora) or None,
            port=port, max_model_len=local.max_model_len, kv_cache_gib=local.kv_cache_gib, cpu_cores=local.cpu_cores,
            startup_timeout=local.startup_timeout_seconds, extra_args=local.extra_args, workdir=self.workdir,
            max_lora_rank=self.config.training.lora.rank, dtype=local.dtype,
        )
        adapters = f" with adapters {', '.join(n for n, _ in spec.lora)}" if spec.lora else ""
        log.info("starting vLLM server for %s as %s%s (log: %s)", spec.model, ", ".join(spec.names), adapters,
                 server.log_path)
        with self.progress.step(f"starting vLLM{adapters} (about a minute on 2 cores; longer the first time)"):
            return server.start()

    def gone(self) -> str | None:
        return next((why for why in (s.gone() for s in self.servers) if why), None)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers, self.specs, self.routes = [], (), {}


def run_local(
    config: RunConfig,
    *,
    progress: bool | None = None,
    workdir: Path | None = None,
    metrics: Metrics | None = None,
    endpoints: Endpoints | None = None,
    restart_from: tuple[str, ...] = (),
) -> dict:
    """Run (or resume) the whole run; returns {iteration: {stage: manifest}}. A configuration that disagrees with
    the run's data is refused (identity.ConfigChanged) unless `restart_from` names the stages to redo."""
    store = open_store(config.storage.uri, config.storage.endpoint_url)
    workdir = workdir or Path(os.environ.get("SELFLENGTHEN_WORKDIR", ".selflengthen"))
    claim(store, config, restart_from, workdir)
    bars = Progress(sys.stderr.isatty() if progress is None else progress, config.iterations)
    metrics = metrics or default_metrics()
    run_metrics = RunMetrics(metrics, config)
    results: dict[int, dict[str, dict]] = {}
    endpoints = endpoints or Endpoints(config, store, workdir)
    endpoints.progress = bars
    ran = 0
    with bars.session():
        try:
            if config.models.base == TINY_URI and not tiny_model_cached():
                log.info("building the tiny model (once: a few minutes on 2 cores; cached for later runs)")
                with bars.step("building the tiny model (first run only: a few minutes on 2 cores)"):
                    ensure_tiny_model()
            elif conversion_pending(config.models.base):
                log.info("converting %s to a Hugging Face checkpoint (once: about 30 s on 2 cores; cached for later "
                         "runs)", config.models.base)
                with bars.step("converting the GGUF model to a checkpoint (first run only: about 30 s)"):
                    resolve_model(config.models.base)
            for iteration in range(1, config.iterations + 1):
                ctx = StageContext(config=config, iteration=iteration, store=store, progress=bars, metrics=metrics)
                stages = iteration_stages(config, iteration)
                results[iteration] = {s: ctx.artifacts(s).manifest() for s in stages if ctx.artifacts(s).done()}
                run_metrics.iteration(iteration, results[iteration])
                if len(results[iteration]) == len(stages):
                    if iteration == config.iterations:  # a finished run run again: its report, up to date
                        report_iteration(store, config, iteration)
                    continue
                for stage in stages:
                    if stage in results[iteration]:
                        continue
                    if stage_table.stage(stage).served:
                        run_metrics.phase("Serving", iteration, stage)
                        ctx.endpoint = endpoints.for_stage(stage, iteration)
                        ctx.model_endpoints = dict(endpoints.routes)
                        ctx.endpoint_gone = endpoints.gone
                    else:
                        endpoints.stop()  # training needs the memory (the GPUs, on a cluster)
                    run_metrics.phase(phase_of(stage), iteration, stage)
                    ran += 1
                    bars.begin(iteration, stage)
                    results[iteration][stage] = run_metrics.attempt(stage, functools.partial(run_stage, stage, ctx))
                    bars.end()
                    run_metrics.iteration(iteration, results[iteration])
                report_iteration(store, config, iteration)
            if not ran:
                log.info("run %s is already complete (%d iterations, every stage done): nothing to do", config.name,
                         config.iterations)
            run_metrics.phase("Succeeded", config.iterations, None)
        except BaseException:
            run_metrics.phase("Failed", run_metrics.current, None)
            raise
        finally:
            bars.close()
            endpoints.stop()
    return results


class RunMetrics:
    """The run-level series of a local run: the same ones the operator sets for a cluster run."""

    NAMESPACE = "local"

    def __init__(self, metrics: Metrics, config: RunConfig):
        self.metrics, self.config, self.current = metrics, config, 1

    def phase(self, phase: str, iteration: int, stage: str | None) -> None:
        self.current = iteration
        self.metrics.set_run(self.config.name, self.NAMESPACE, phase=phase, iteration=iteration,
                             iterations=self.config.iterations, stage=stage)

    def attempt(self, stage: str, call):
        labels = {"run": self.config.name, "namespace": self.NAMESPACE, "stage": stage}
        self.metrics.stage_attempts.labels(**labels).inc()
        try:
            return call()
        except Exception as err:
            self.metrics.stage_failures.labels(**labels, reason=type(err).__name__).inc()
            raise

    def iteration(self, iteration: int, manifests: dict[str, dict]) -> None:
        self.metrics.set_iteration(self.config.name, self.NAMESPACE, iteration, manifests)


def report_iteration(store: Store, config: RunConfig, iteration: int) -> None:
    """Write the iteration's report (pipeline/report.py) and log where it is, with its headline numbers."""
    report = refresh_report(store, config, iteration)
    if report is None:
        return
    ln, lg = report["lengths"], report["longen"] or {}
    log.info("iteration %d report in %s: words initial %s -> extended %s (max %s), LonGen score %s",
             iteration, f"{store.uri}/{config.name}/report/", ln["initialAverage"], ln["extendedAverage"],
             ln["extendedMax"], lg.get("overall", "-"))


def summary(config: RunConfig, results: dict[int, dict[str, dict]], store_uri: str) -> str:
    """What `selflengthen run` prints: each iteration's Markdown report (the one in the store), or a short
    summary built from the manifests where a report could not be written."""
    lines = [f"run {config.name}: {len(results)} iteration(s), artifacts in {store_uri}/{config.name}, "
             f"reports in {store_uri}/{config.name}/report/"]
    try:
        store = open_store(config.storage.uri, config.storage.endpoint_url)
        reports = {k: read_markdown(store, config, k) for k in results}
    except Exception as err:  # the store went away after the run: fall back to the manifests in hand
        log.warning("reports not read: %s", err)
        reports = {}
    for iteration, stages in results.items():
        if reports.get(iteration):
            lines += ["", reports[iteration].rstrip()]
            continue
        lines.append(f"iteration {iteration}:")
        for stage, manifest in stages.items():
            counts = manifest.get("counts", {})
            if stage.startswith("train-"):
                epochs = manifest.get("epochLosses") or [0.0]
                lines.append(f"  {stage:<15} {manifest.get('steps', 0)} steps on {counts.get('accepted', 0)} "
                             f"examples, mean loss of the first epoch {epochs[0]:.3f}, of the last {epochs[-1]:.3f} "
                             f"({manifest.get('mode')}, {manifest.get('trainSeconds', 0):.0f}s)")
                continue
            if stage == "evaluate" and manifest.get("enabled", True):
                scores = manifest.get("scores", {})
                by_type = ", ".join(f"{k} {v:.2f}" for k, v in (scores.get("byType") or {}).items() if v is not None)
                lines.append(f"  {stage:<15} LonGen score {scores.get('overall') or 0:.3f} on "
                             f"{counts.get('accepted', 0)} items ({by_type}); average words "
                             f"{manifest.get('averageWords', 0)}")
                continue
            requested, accepted = counts.get("requested", 0), counts.get("accepted", 0)
            rate = f"{accepted / requested:.0%}" if requested else "-"
            rejected = ", ".join(f"{k} {v}" for k, v in sorted(counts.get("rejected", {}).items())) or "none"
            lines.append(f"  {stage:<15} {accepted}/{requested} accepted ({rate}); "
                         f"requests {counts.get('requests', 0)}; rejected tries: {rejected}")
        ext = stages.get("extend")
        if ext:
            lines.append(f"  average words: initial {ext['averageWordsInitial']} -> extended {ext['averageWords']} "
                         f"(x{ext['growth']}), max {ext['maxWords']}")
    return "\n".join(lines)
