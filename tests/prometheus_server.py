"""A real Prometheus server for tests: started on a free loopback port, scraping given targets every second."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import yaml

from selflengthen.pipeline.serving import free_port


class PrometheusServer:
    def __init__(self, binary: str, targets: dict[str, list[str]], rule_files, workdir: Path):
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]}
                               for job, hosts in targets.items()],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> PrometheusServer:
        self.log = open(self.workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.workdir / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
        self.log.close()

    def api(self, path: str, **params) -> dict:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        if body.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def metric_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def wait_until(self, predicate, timeout: float = 60, interval: float = 0.5):
        """Poll predicate() until it returns something truthy (scrapes land every second)."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result or time.monotonic() > deadline:
                return result
            time.sleep(interval)
