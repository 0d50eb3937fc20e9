"""The operator's view of the store: completion markers and manifests read with the run's credentials Secret,
through its own Kubernetes client (against kmock) and a real S3 endpoint (moto)."""

from __future__ import annotations

import base64

import kopf
import pytest

from kube_fixtures import RealisticKubernetes, make_run, spec
from selflengthen.operator.kube import SECRETS, ApiError, Kube
from selflengthen.operator.probe import store_probe
from selflengthen.pipeline.artifacts import StageArtifacts
from selflengthen.pipeline.store import open_store

pytestmark = pytest.mark.kmock(cls=RealisticKubernetes)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_probe_reads_markers_with_the_runs_secret(kmock, s3_endpoint):
    kmock.resources.load_bundled()
    kube = Kube(lambda: kopf.ConnectionInfo(server=str(kmock.url)))
    try:
        run = make_run(spec(storage={"uri": "s3://runs/operator-probe", "endpointUrl": s3_endpoint,
                                     "credentialsSecret": "s3", "region": "us-east-1"}))
        with pytest.raises(LookupError, match="Secret s3 not found in namespace ml"):
            await store_probe(kube, run)
        await kube.create(SECRETS, "ml", {"metadata": {"name": "s3"}, "data": {
            "AWS_ACCESS_KEY_ID": b64("testing"), "AWS_SECRET_ACCESS_KEY": b64("testing")}})
        store = open_store("s3://runs/operator-probe", s3_endpoint)
        StageArtifacts(store, "demo", 1, "self-instruct").finish({"counts": {"accepted": 3}})
        probe = await store_probe(kube, run)
        assert probe.done(1, "self-instruct") and not probe.done(1, "respond")
        assert probe.manifest(1, "self-instruct")["counts"] == {"accepted": 3}
        assert probe.manifest(1, "respond") is None
        # collect's artifacts are the run's (<run>/collect/), not an iteration's
        from selflengthen.pipeline.stages import RunArtifacts

        assert not probe.done(1, "collect")
        RunArtifacts(store, "demo", 1, "collect").finish({"counts": {"accepted": 2}})
        assert probe.done(1, "collect") and probe.manifest(1, "collect")["counts"] == {"accepted": 2}
        assert not StageArtifacts(store, "demo", 1, "collect").done()
        assert probe.delete_run() == 4 and not probe.done(1, "self-instruct")
    finally:
        await kube.close()


async def test_kube_client_basics(kmock):
    kmock.resources.load_bundled()
    kube = Kube(lambda: kopf.ConnectionInfo(server=str(kmock.url)))
    try:
        from selflengthen.operator.kube import CONFIGMAPS

        await kube.create(CONFIGMAPS, "ml", {"metadata": {"name": "a", "labels": {"x": "1"}}, "data": {}})
        await kube.create(CONFIGMAPS, "ml", {"metadata": {"name": "b", "labels": {"x": "2"}}, "data": {}})
        assert [o["metadata"]["name"] for o in await kube.list(CONFIGMAPS, "ml", {"x": "1"})] == ["a"]
        patched = await kube.patch(CONFIGMAPS, "ml", "a", {"data": {"k": "v"}})
        assert patched["data"] == {"k": "v"}
        with pytest.raises(ApiError) as err:
            await kube.create(CONFIGMAPS, "ml", {"metadata": {"name": "a"}})
        assert err.value.status == 409
        assert await kube.delete(CONFIGMAPS, "ml", "a") is True
        assert await kube.delete(CONFIGMAPS, "ml", "a") is False
        assert await kube.get(CONFIGMAPS, "ml", "a") is None
    finally:
        await kube.close()
