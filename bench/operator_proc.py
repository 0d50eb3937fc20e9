"""The operator as bench/operator_load.py runs it: its own process, so that its memory is its own RSS.

    python bench/operator_proc.py API_URL NAMESPACE POLL_SECONDS

The production registry (selflengthen.operator.handlers.build_registry, production kopf settings) against the given
Kubernetes API, watching one namespace; the artifact store is a stand-in in which no stage is done yet (the runs
stay at their first step: serving, whose Deployment nobody makes ready). Prints `ready` once kopf is up; stops
cleanly when its stdin closes. Needs nothing from bench/ (run with PYTHONSAFEPATH=1 like everything here).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

import kopf

from selflengthen.operator.handlers import OperatorOptions, build_registry


class NothingDone:
    """The store as a run's first reconcile finds it: no markers, no manifests."""

    def done(self, iteration: int, stage: str) -> bool:
        return False

    def manifest(self, iteration: int, stage: str) -> dict | None:
        return None

    def delete_run(self) -> int:
        return 0


async def main(url: str, namespace: str, poll: float) -> None:
    store = NothingDone()

    async def probe(kube, run):
        return store

    options = OperatorOptions(poll_seconds=poll, login=lambda **_: kopf.ConnectionInfo(server=url), probe=probe)
    registry, _ = build_registry(options)
    stop, ready = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def until_stdin_closes() -> None:
        for _ in sys.stdin:
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    task = asyncio.create_task(kopf.operator(registry=registry, namespaces=[namespace], standalone=True,
                                             stop_flag=stop, ready_flag=ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        print("ready", flush=True)
    else:
        waiter.cancel()
    await task


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
