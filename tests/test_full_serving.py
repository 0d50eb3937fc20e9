"""Full fine-tuning, locally: each role's trained weights are a model of their own, served by their own server
(vLLM serves one model a process), in every iteration; a stage that asks two of them (collect) gets one server
each, and its client routes every request by model name. The servers are scripted chat servers, each as strict as
vLLM about the names it serves (any other is answered 404), standing in for vLLM loading the weights it was
started with."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from chat_server import ChatServer
from test_collect import reply

from selflengthen.pipeline.config import Sampling, parse_config
from selflengthen.pipeline.inference import RoutedClient
from selflengthen.pipeline.runner import Endpoints, server_specs
from selflengthen.pipeline.stages import StageContext, run_stage
from selflengthen.pipeline.stages.common import make_client
from selflengthen.pipeline.store import LocalStore
from selflengthen.pipeline.treestore import upload_tree


def full_ctx(tmp_path: Path, iteration: int = 2) -> StageContext:
    config = parse_config({
        "name": "full", "iterations": 2, "seed": 5, "languages": ["en", "zh"],
        "models": {"base": str(tmp_path / "base-weights")},
        "filters": {"checkEnding": False, "checkMeta": False, "enNgram": 0, "zhNgram": 0},
        "client": {"concurrency": 4, "deadlineSeconds": 10, "backoffSeconds": 0.01},
        "storage": {"uri": f"file://{tmp_path}/store", "shardSize": 8},
        "training": {"mode": "full"},
        "collect": {"enabled": True, "items": 16},
    })
    ctx = StageContext(config=config, iteration=iteration, store=LocalStore(tmp_path / "store"))
    for k in (1, 2):  # each role's trained weights of each iteration, as train-<role> stores them
        for role in ("generator", "extender"):
            src = tmp_path / "trained" / f"{k}-{role}"
            src.mkdir(parents=True)
            (src / "config.json").write_text(json.dumps({"trained": f"{role} of iteration {k}"}))
            upload_tree(ctx.store, src, f"full/iter-{k:02d}/train-{role}/model", meta={"mode": "full"})
            ctx.artifacts(f"train-{role}", k).finish({})
    return ctx


def weights_of(path: str) -> str:
    return json.loads((Path(path) / "config.json").read_text())["trained"]


def test_every_stage_of_every_iteration_is_served_each_role_s_own_weights(tmp_path):
    ctx = full_ctx(tmp_path)
    work = tmp_path / "work"

    def served(stage: str, k: int) -> dict[tuple[str, ...], str]:
        specs = server_specs(ctx.config, ctx.store, stage, k, work)
        assert all(not s.lora for s in specs)  # whole models, no adapters
        return {s.names: "base" if s.model == ctx.config.models.base else weights_of(s.model) for s in specs}

    # iteration 1: the base model under every name, one server
    assert served("self-instruct", 1) == served("extend", 1) == {("generator", "extender", "base"): "base"}
    for k in (1, 2):
        if k == 2:  # iteration 2's data stages: iteration 1's models, each its own; self-instruct the base model
            assert served("self-instruct", 2) == {("base",): "base"}
            assert served("respond", 2) == {("generator",): "generator of iteration 1"}
            assert served("extend", 2) == {("extender",): "extender of iteration 1"}
        assert served("evaluate", k) == {("generator",): f"generator of iteration {k}"}
        # collect asks both: two servers, each with its own role's weights
        assert served("collect", k) == {("generator",): f"generator of iteration {k}",
                                        ("extender",): f"extender of iteration {k}"}


class ScriptedServers(Endpoints):
    """The runner's Endpoints with each vLLM server replaced by a scripted chat server that serves the names of
    its spec only, and remembers the weights it was given."""

    def start(self, spec, port):
        server = ChatServer(reply, models=spec.names).__enter__()
        server.weights, server.gone = spec.model, lambda: None
        server.stop = lambda: server.__exit__(None, None, None)
        self.started.append(server)
        return server


def test_collect_in_full_mode_asks_the_extender_on_the_extender_s_weights(tmp_path):
    ctx = full_ctx(tmp_path)
    endpoints = ScriptedServers(ctx.config, ctx.store, tmp_path / "work")
    endpoints.started = []
    try:
        ctx.endpoint = endpoints.for_stage("collect", 2)
        ctx.model_endpoints = dict(endpoints.routes)
        assert ctx.endpoint == endpoints.started[0].endpoint
        assert ctx.model_endpoints == {"extender": endpoints.started[1].endpoint}
        manifest = run_stage("collect", ctx)
        generator, extender = endpoints.started
        assert weights_of(generator.weights) == "generator of iteration 2"
        assert weights_of(extender.weights) == "extender of iteration 2"
        # every request reached the server of its model's own weights (a wrong one would have answered 404)
        assert extender.bodies("extender") and not generator.bodies("extender")
        assert generator.bodies("generator") and not extender.bodies("generator")
        assert not generator.refusals and not extender.refusals
        assert len(extender.bodies("extender")) == 2 * len(generator.bodies("generator"))
        assert manifest["counts"]["extended"] > 0
        # a stage that asks one model: one server, no routes; the others are stopped
        assert endpoints.for_stage("extend", 2) == endpoints.started[2].endpoint and endpoints.routes == {}
        assert weights_of(endpoints.started[2].weights) == "extender of iteration 1"
    finally:
        endpoints.stop()


def test_the_routed_client_sends_each_model_to_its_own_server(tmp_path):
    ctx = full_ctx(tmp_path, iteration=1)
    with ChatServer(lambda b: "from the generator.", models=("generator", "base")) as gen, \
            ChatServer(lambda b: "from the extender.", models=("extender",)) as ext:
        ctx.endpoint, ctx.model_endpoints = gen.endpoint, {"extender": ext.endpoint}

        async def ask():
            async with make_client(ctx, "t") as client:
                assert isinstance(client, RoutedClient)
                sampling = Sampling.model_validate({"maxTokens": 8})
                return [(await client.chat(m, [{"role": "user", "content": "hi"}], sampling)).text
                        for m in ("generator", "extender", "base")]

        assert asyncio.run(ask()) == ["from the generator.", "from the extender.", "from the generator."]
        assert [b["model"] for b in ext.bodies("extender")] == ["extender"]
        # without routes: one client, as before
        ctx.model_endpoints = {}
        single = make_client(ctx, "t")
        assert not isinstance(single, RoutedClient) and single.endpoint == gen.endpoint
        asyncio.run(single.aclose())


@pytest.mark.parametrize("value,error", [("extender", "NAME=URL wanted"), ("=http://x:1/v1", "NAME=URL wanted"),
                                         ("extender=ftp://x", "--model-endpoint extender: must be an http")])
def test_the_stage_command_refuses_a_bad_model_endpoint(value, error):
    from selflengthen.cli import _model_endpoints
    from selflengthen.pipeline.config import ConfigError

    assert _model_endpoints(["extender=http://h:8001/v1/"]) == {"extender": "http://h:8001/v1"}
    with pytest.raises(ConfigError, match=error):
        _model_endpoints([value])
