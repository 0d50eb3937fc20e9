"""What the operator reads of the artifact store: stage completion markers and manifests (never the data).

The store is opened with the run's own credentials Secret (read through the API, held in memory only, never
logged) or, without one, the operator's identity (IRSA, workload identity). A store it cannot reach is not an
error of the run: the operator then goes by its status and the Jobs' outcomes alone.
"""

from __future__ import annotations

import base64
import logging
from typing import Protocol

from ..pipeline.artifacts import StageArtifacts, artifacts_of
from ..pipeline.layout import check_run_name
from ..pipeline.store import Store, open_store
from .kube import SECRETS, Kube
from .resources import Run

log = logging.getLogger("selflengthen.operator")


class Probe(Protocol):
    def done(self, iteration: int, stage: str) -> bool: ...
    def manifest(self, iteration: int, stage: str) -> dict | None: ...
    def delete_run(self) -> int: ...


class StoreProbe:
    def __init__(self, store: Store, run: str):
        self.store, self.run = store, run

    def artifacts(self, iteration: int, stage: str) -> StageArtifacts:
        return artifacts_of(self.store, self.run, iteration, stage)  # collect's artifacts are the run's

    def done(self, iteration: int, stage: str) -> bool:
        return self.artifacts(iteration, stage).done()

    def manifest(self, iteration: int, stage: str) -> dict | None:
        try:
            return self.artifacts(iteration, stage).manifest()
        except KeyError:
            return None

    def delete_run(self) -> int:
        keys = self.store.list(check_run_name(self.run))
        for key in keys:
            self.store.delete(key)
        return len(keys)


async def store_probe(kube: Kube, run: Run) -> StoreProbe:
    """The run's store, with the credentials the run's pods get."""
    cfg, access = run.config, run.cluster.storage
    if not access.credentials_secret:
        return StoreProbe(open_store(cfg.storage.uri, cfg.storage.endpoint_url), run.name)
    secret = await kube.get(SECRETS, run.namespace, access.credentials_secret)
    if secret is None:
        raise LookupError(f"Secret {access.credentials_secret} not found in namespace {run.namespace}")
    data = secret.get("data") or {}

    def value(key: str) -> str | None:
        raw = data.get(key)
        return base64.b64decode(raw).decode() if raw else None

    import boto3
    from botocore.config import Config

    from ..pipeline.store import S3Store

    client = boto3.client(
        "s3", endpoint_url=cfg.storage.endpoint_url, region_name=access.region or value("AWS_REGION"),
        aws_access_key_id=value(access.access_key_id_key), aws_secret_access_key=value(access.secret_access_key_key),
        aws_session_token=value("AWS_SESSION_TOKEN"),
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=20),
    )
    bucket, _, prefix = cfg.storage.uri[len("s3://"):].partition("/")
    return StoreProbe(S3Store(bucket, prefix, client=client), run.name)
