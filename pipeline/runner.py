"""The local orchestrator: runs every stage of every macro-iteration on this machine.

It decides what to do next from the store's completion markers only, so a killed run, started again, resumes
at the first unfinished stage. When the configuration names no inference endpoint it starts a vLLM server as
a subprocess (the local stand-in for the operator's inference Deployment) and stops it on exit or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from .config import RunConfig, dump_config
from .metrics import Metrics
from .metrics import metrics as default_metrics
from .serving import VLLMServer
from .stages import DATA_STAGES, StageContext, run_stage
from .store import Store, open_store
from .tinymodel import resolve_model

log = logging.getLogger("selflengthen.runner")


def stages_of_iteration(config: RunConfig) -> tuple[str, ...]:
    return DATA_STAGES


class Progress:
    """One progress bar per stage, on stderr; silent when stderr is not a terminal unless forced."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=f"{stage:>13}", unit="item", file=sys.stderr)
        bar.n = done
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


@contextlib.contextmanager
def inference_endpoint(config: RunConfig, workdir: Path) -> Iterator[str]:
    """The configured endpoint, or a local vLLM server serving the base model as Generator and Extender."""
    if config.models.endpoint:
        yield config.models.endpoint
        return
    local = config.local
    server = VLLMServer(
        resolve_model(config.models.base),
        served_names=[config.models.generator, config.models.extender],
        port=local.port, max_model_len=local.max_model_len, kv_cache_gib=local.kv_cache_gib,
        startup_timeout=local.startup_timeout_seconds, extra_args=local.extra_args, workdir=workdir,
    )
    log.info("starting vLLM server for %s (log: %s)", config.models.base, server.log_path)
    with server:
        yield server.endpoint


def save_config(store: Store, config: RunConfig) -> None:
    store.write(f"{config.name}/config.yaml", dump_config(config).encode())


def run_local(
    config: RunConfig,
    *,
    progress: bool | None = None,
    workdir: Path | None = None,
    metrics: Metrics | None = None,
) -> dict:
    """Run (or resume) the whole run; returns {iteration: {stage: manifest}}."""
    store = open_store(config.storage.uri, config.storage.endpoint_url)
    save_config(store, config)
    workdir = workdir or Path(os.environ.get("SELFLENGTHEN_WORKDIR", ".selflengthen"))
    bars = Progress(sys.stderr.isatty() if progress is None else progress)
    metrics = metrics or default_metrics()
    status = RunStatus(metrics, config)
    results: dict[int, dict[str, dict]] = {}
    try:
        for iteration in range(1, config.iterations + 1):
            ctx = StageContext(config=config, iteration=iteration, store=store, progress=bars, metrics=metrics)
            stages = stages_of_iteration(config)
            results[iteration] = {s: ctx.artifacts(s).manifest() for s in stages if ctx.artifacts(s).done()}
            status.iteration(iteration, results[iteration])
            if len(results[iteration]) == len(stages):
                continue
            status.phase("Serving", iteration, None)
            with inference_endpoint(config, workdir) as endpoint:
                ctx.endpoint = endpoint
                for stage in stages:
                    if stage in results[iteration]:
                        continue
                    status.phase("Generating", iteration, stage)
                    results[iteration][stage] = status.attempt(stage, lambda: run_stage(stage, ctx))
                    status.iteration(iteration, results[iteration])
        status.phase("Succeeded", config.iterations, None)
    except BaseException:
        status.phase("Failed", status.current, None)
        raise
    finally:
        bars.close()
    return results


class RunStatus:
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


def summary(config: RunConfig, results: dict[int, dict[str, dict]], store_uri: str) -> str:
    """A short human summary: counts, acceptance per filter, words before and after extension."""
    lines = [f"run {config.name}: {len(results)} iteration(s), artifacts in {store_uri}/{config.name}"]
    for iteration, stages in results.items():
        lines.append(f"iteration {iteration}:")
        for stage, manifest in stages.items():
            counts = manifest.get("counts", {})
            requested, accepted = counts.get("requested", 0), counts.get("accepted", 0)
            rate = f"{accepted / requested:.0%}" if requested else "-"
            rejected = ", ".join(f"{k} {v}" for k, v in sorted(counts.get("rejected", {}).items())) or "none"
            lines.append(f"  {stage:<13} {accepted}/{requested} accepted ({rate}); "
                         f"requests {counts.get('requests', 0)}; rejected tries: {rejected}")
        ext = stages.get("extend")
        if ext:
            lines.append(f"  average words: initial {ext['averageWordsInitial']} -> extended {ext['averageWords']} "
                         f"(x{ext['growth']}), max {ext['maxWords']}")
    return "\n".join(lines)
