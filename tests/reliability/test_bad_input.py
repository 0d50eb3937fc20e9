"""Bad input is refused with a clear error that names what is wrong, and nothing already in the store is lost.

  * configuration: a hypothesis property test over malformed and boundary run configurations (as Python data
    and as YAML text): each is accepted (and then round-trips) or refused with ConfigError naming the field path;
  * data: empty or malformed seed files, non-UTF-8 bytes, huge instructions, a server answering with an empty
    body, wrong JSON, no choices or empty text, a model name the server does not know, a tokenizer without a
    chat template;
  * names: run names and storage prefixes that would escape the run's prefix or land in another run's tree.

A small fake OpenAI-compatible server plays the broken server where the real vLLM cannot produce the fault;
the huge instruction and the unknown model are asked of the real vLLM (marked vllm).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from selflengthen.pipeline.artifacts import StageArtifacts, check_run_name, iteration_prefix
from selflengthen.pipeline.config import ConfigError, RunConfig, dump_config, load_config, parse_config
from selflengthen.pipeline.inference import InferenceClient
from selflengthen.pipeline.stages import StageContext, StageError, run_stage
from selflengthen.pipeline.store import LocalStore, S3Store, dumps_jsonl, open_store

from conftest import BUCKET

if not os.environ.get("CI"):  # in CI a missing hypothesis is an error, not a skip
    pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- configuration: property tests -----------------------------------------------------------------------------------


def _fields(model=RunConfig, prefix: tuple[str, ...] = ()):
    """(camelCase path, FieldInfo) of every field, sections included, as the YAML file spells them."""
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        path = (*prefix, info.alias or name)
        yield path, info
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _fields(info.annotation, path)


FIELDS = dict(_fields())
TYPOS = [("bogus",), ("sampling", "temperatur"), ("models", "apiKey"), ("storage", "credentials"),
         ("selfInstruct", "seedfile"), ("training", "lora", "ranks"), ("client", "retries")]


def _boundaries(info) -> list:
    """Values at and just beyond the field's numeric and length bounds."""
    values = []
    for meta in info.metadata:
        for attr in ("ge", "gt", "le", "lt"):
            bound = getattr(meta, attr, None)
            if isinstance(bound, int | float):
                values += [bound, bound - 1, bound + 1, bound - 1e-9, bound + 1e-9, bound * 10]
        for attr in ("min_length", "max_length"):
            bound = getattr(meta, attr, None)
            if isinstance(bound, int):
                values += ["x" * bound, "x" * (bound + 1), ["en"] * bound, ["en"] * (bound + 1)]
    return values


def _default(info) -> list:
    """The field's default as the YAML file would spell it (a valid value, so that some cases are accepted)."""
    from pydantic import BaseModel

    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True)
    return [value] if value is not None else []


ODD_STRINGS = ["", " ", "..", "../x", "a/b", "a/../b", "/abs", "A", "x" * 64, "x" * 300, "-a", "a-", "a_b", "é",
               "\x00", "s3://", "s3://runs", "s3://runs/../x", "s3://runs/a/../../b", "s3://A/x", "s3://ab",
               "s3://runs/p", "file://", "file:///tmp/x", "http://", "http://h:1/v1", "ftp://x", "not a url",
               "en", "zh", "fr", "lora", "full", "auto", "cosine", "all-linear", "1e3", "true", "null", "NaN"]
ODD = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, 1, -1, 2, 63, 64, 1024, 2**31, 2**32, 2**63, -(2**63), 10**30]),
    st.integers(-(10**6), 10**6),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, 2.0, 1e-9, 1e308, 5e-324, math.nan, -math.inf]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(ODD_STRINGS), st.text(max_size=12),
    st.lists(st.sampled_from(["en", "zh", "", "x", "en"]), max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["a", "rank", "uri", "1"]), st.integers(0, 3), max_size=2),
)


@st.composite
def mutated_configs(draw) -> tuple[dict, list[str]]:
    """A small valid configuration with a few fields set to odd or boundary values, or unknown fields added.
    Returns the data and the dotted paths that were touched."""
    data: dict = {"name": "prop", "iterations": 1, "storage": {"uri": "s3://runs/prop"}}
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(FIELDS) + TYPOS))
        info = FIELDS.get(path)
        near = (_boundaries(info) + _default(info)) if info is not None else []
        value = draw(st.one_of(ODD, st.sampled_from(near), st.sampled_from(near)) if near else ODD)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
        touched.append(".".join(path))
    return data, touched


def _relates(reported: str, touched: str) -> bool:
    """The reported path is the touched field, inside it (a list item, a union member), or a section around it
    (a section-level check, or a section replaced by a scalar)."""
    return reported == touched or reported.startswith(touched + ".") or touched.startswith(reported + ".")


def assert_config_outcome(data: object, touched: list[str]) -> RunConfig | None:
    try:
        config = parse_config(data)
    except ConfigError as err:
        lines = str(err).splitlines()
        assert lines[0] == "invalid run configuration:" and len(lines) > 1, str(err)
        for line in lines[1:]:
            reported, sep, message = line.strip().partition(": ")
            assert sep and message, line
            assert any(_relates(reported, t) for t in touched), (touched, str(err))
        return None
    # accepted: it runs as read back from its own dump (what the local runner stores, what Jobs read)
    assert parse_config(yaml.safe_load(dump_config(config))) == config
    assert iteration_prefix(config.name, config.iterations).startswith(config.name + "/")
    return config


@PROPERTY
@given(mutated_configs())
def test_config_is_accepted_or_refused_naming_the_field(case):
    data, touched = case
    event("accepted" if assert_config_outcome(data, touched) else "refused")


YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                         st.text(max_size=8), st.sampled_from(list(FIELDS)[:5]).map(".".join))
YAML_DOCS = st.recursive(
    YAML_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from([p[-1] for p in FIELDS] + ["bogus"]), st.integers(0, 2)),
                        children, max_size=4),
    ),
    max_leaves=12,
)
RAW_TEXT = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
    st.sampled_from([b"", b"---\n", b"- a\n- b\n", b"name: [unclosed", b"a: b: c", b"\t- x",
                     b"!!python/object:os.system x", b"name: &a x\nseed: *a\n", b"\xff\xfename: x",
                     b"\xef\xbb\xbfname: bom-run\n", b"name: ok\nname: ok\n", b"%YAML 9.9\n---\nname: x", b"{"]),
)


@PROPERTY
@given(st.one_of(YAML_DOCS.map(lambda doc: yaml.safe_dump(doc).encode()), RAW_TEXT))
def test_config_files_are_read_or_refused_with_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_bytes(text)
    try:
        load_config(path)
        event("accepted")
    except ConfigError as err:
        message = str(err)
        if message.startswith("invalid run configuration"):
            event("refused")
        else:  # refused by the YAML loader: one line naming the file, line and column
            assert re.match(rf"^{re.escape(str(path))}:\d+:\d+: [^\n]+$", message), message
            event("refused: not YAML" if "not valid YAML" in message else "refused: by the loader")


@pytest.mark.parametrize("data, path", [
    ({"name": "../escape"}, "name"), ({"name": "a/b"}, "name"), ({"name": "Upper"}, "name"), ({"name": ""}, "name"),
    ({"name": "x" * 64}, "name"), ({"iterations": 0}, "iterations"), ({"seed": -1}, "seed"),
    ({"languages": ["en", "en"]}, "languages"), ({"languages": []}, "languages"),
    ({"sampling": {"topP": 0}}, "sampling.topP"), ({"sampling": {"temperature": math.nan}}, "sampling.temperature"),
    ({"sampling": {"stop": [""]}}, "sampling.stop.0"), ({"sampling": 3}, "sampling"),
    ({"selfInstruct": {"minWords": 10, "maxWords": 11}}, "selfInstruct"),
    ({"models": {"endpoint": "ftp://x"}}, "models.endpoint"), ({"models": {"apiKeyEnv": "1BAD"}}, "models.apiKeyEnv"),
    ({"storage": {"uri": "s3://runs/../other"}}, "storage.uri"), ({"storage": {"shardSize": 0}}, "storage.shardSize"),
    ({"training": {"lora": {"rank": 0}}}, "training.lora.rank"), ({"client": {"concurrency": 0}}, "client.concurrency"),
    ({"sampling": {"temperatur": 0.5}}, "sampling.temperatur"), ([], None), ("name: x", None),
])
def test_known_bad_configs_name_their_field(data, path):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    if path is None:
        assert "expected a mapping at the top level" in str(err.value)
    else:
        assert re.search(rf"^  {re.escape(path)}: ", str(err.value), re.M), str(err.value)


def test_deeply_nested_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("name: " + "[" * 2000 + "]" * 2000)
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize("field", ["deadlineSeconds", "backoffSeconds", "requestTimeoutSeconds"])
def test_infinite_durations_are_refused(field):
    with pytest.raises(ConfigError, match=f"client.{field}"):
        parse_config({"client": {field: math.inf}})


# -- data: seed files ------------------------------------------------------------------------------------------------


def tiny_config(tmp_path: Path, **overrides) -> RunConfig:
    data = {
        "name": "bad-input", "iterations": 1, "seed": 5,
        "sampling": {"maxTokens": 32},
        "selfInstruct": {"instructionsPerIteration": 4, "maxTries": 2, "judge": False, "minWords": 0},
        "respond": {"samplesPerInstruction": 1, "maxRetries": 2},
        "filters": {"checkEnding": False, "checkMeta": False, "dropShort": False},
        "client": {"concurrency": 2, "maxAttempts": 2, "backoffSeconds": 0.01, "deadlineSeconds": 5,
                   "requestTimeoutSeconds": 10},
        "storage": {"uri": f"file://{tmp_path}/store", "shardSize": 2},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(data)


def snapshot(store: LocalStore) -> dict[str, bytes]:
    return {key: store.read(key) for key in store.list("")}


@pytest.fixture
def store_with_history(tmp_path) -> LocalStore:
    """A store that already holds work: another run's finished stage and this run's earlier, finished respond
    shard on top of a finished self-instruct (what a resumed run finds)."""
    store = LocalStore(tmp_path / "store")
    other = StageArtifacts(store, "other-run", 1, "respond")
    other.write_work(0, [{"id": "o1"}])
    other.write_outputs([{"id": "o1"}], 8)
    other.finish({"counts": {"accepted": 1}})
    si = StageArtifacts(store, "bad-input", 1, "self-instruct")
    rows = [{"id": f"i01-{j:07d}", "language": "en", "instruction": f"Write about topic {j} in detail.", "words": 6}
            for j in range(6)]
    si.write_work(0, rows)
    si.write_outputs(rows, 2)
    si.finish({"counts": {"requested": 6, "accepted": 6}})
    StageArtifacts(store, "bad-input", 1, "respond").write_work(0, [
        {"id": f"{r['id']}-s0", "instructionId": r["id"], "language": "en", "instruction": r["instruction"],
         "response": "An earlier answer.", "words": 3, "rejections": {}, "requests": 1} for r in rows[:2]])
    return store


def assert_nothing_lost(store: LocalStore, before: dict[str, bytes], stage: str) -> None:
    after = snapshot(store)
    assert {k: after.get(k) for k in before} == before  # every object still there, byte for byte
    assert not StageArtifacts(store, "bad-input", 1, stage).done()


SEED_FILES = {
    "empty": (b"", r"empty \(no JSON lines with a 'prompt'\)"),
    "blank": (b"\n  \n\n", r"empty"),
    "not-json": (b'{"prompt": "Write a story."}\n{"prompt": oops}\n', r"line 2: not valid JSON"),
    "not-object": (b'["Write a story."]\n', r"line 1: an object with a non-empty string 'prompt' wanted"),
    "no-prompt": (b'{"instruction": "Write."}\n', r"line 1: an object with a non-empty string 'prompt'"),
    "prompt-not-text": (b'{"prompt": 42}\n', r"line 1: an object with a non-empty string 'prompt'"),
    "prompt-blank": (b'{"prompt": "  "}\n', r"line 1: an object with a non-empty string 'prompt'"),
    "latin-1": (b'{"prompt": "ok"}\n{"prompt": "Caf\xe9"}\n', r"line 2: not UTF-8 text \(byte 0xe9\)"),
    "utf-16": ('{"prompt": "x"}\n'.encode("utf-16"), r"line 1: not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(SEED_FILES))
def test_bad_seed_files_are_refused_naming_file_line_and_setting(tmp_path, store_with_history, case):
    content, wanted = SEED_FILES[case]
    seed_file = tmp_path / f"{case}.jsonl"
    seed_file.write_bytes(content)
    before = snapshot(store_with_history)
    config = tiny_config(tmp_path, selfInstruct={"seedFile": str(seed_file)})
    ctx = StageContext(config=config, iteration=1, store=store_with_history, endpoint="http://127.0.0.1:9/v1")
    store_with_history.delete("bad-input/iter-01/self-instruct/_SUCCESS")  # self-instruct runs again, from its work
    before.pop("bad-input/iter-01/self-instruct/_SUCCESS")
    with pytest.raises(StageError) as err:
        run_stage("self-instruct", ctx)
    message = str(err.value)
    assert f"seed file {seed_file}" in message and "selfInstruct.seedFile" in message, message
    assert re.search(wanted, message), message
    assert_nothing_lost(store_with_history, before, "self-instruct")


@pytest.mark.parametrize("where", ["missing", "directory"])
def test_unreadable_seed_file_is_refused(tmp_path, where):
    path = tmp_path / "nope.jsonl" if where == "missing" else tmp_path
    config = tiny_config(tmp_path, selfInstruct={"seedFile": str(path)})
    ctx = StageContext(config=config, iteration=1, store=LocalStore(tmp_path / "s"), endpoint="http://127.0.0.1:9/v1")
    wanted = rf"seed file {re.escape(str(path))}: cannot be read \((No such file|Is a dir)"
    with pytest.raises(StageError, match=wanted):
        run_stage("self-instruct", ctx)


def test_a_later_iteration_refuses_an_unfinished_earlier_one(tmp_path):
    """Readers go through done(): iteration 2's instruction pool never takes iteration 1's half-written outputs."""
    store = LocalStore(tmp_path / "store")
    config = tiny_config(tmp_path, iterations=2)
    half = StageArtifacts(store, "bad-input", 1, "self-instruct")
    half.write_outputs([{"id": "x", "language": "en", "instruction": "half written", "words": 2}], 8)  # no _SUCCESS
    ctx = StageContext(config=config, iteration=2, store=store, endpoint="http://127.0.0.1:9/v1")
    with pytest.raises(StageError, match="needs self-instruct of iteration 1 to be done first"):
        run_stage("self-instruct", ctx)


# -- data: a broken inference server ---------------------------------------------------------------------------------


class BrokenServer:
    """An OpenAI-compatible endpoint on loopback answering every request with one fixed (status, body), except
    GET /v1/models, which lists the models with their context as vLLM does (the client reads it to budget
    max_tokens), and /tokenize, which it lacks (404): what is broken is the generation path, which `hits`
    counts."""

    def __init__(self, status: int, body: bytes):
        self.status, self.body, self.hits = status, body, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, body = server.status, server.body
                if self.path.rstrip("/").endswith("/tokenize"):  # a server without vLLM's /tokenize
                    status, body = 404, b'{"detail": "Not Found"}'
                else:
                    server.hits += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    body = json.dumps({"object": "list", "data": [
                        {"id": name, "object": "model", "max_model_len": 1 << 20}
                        for name in ("generator", "extender", "base")]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.do_POST()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> BrokenServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_reply(content) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}], "usage": {"completion_tokens": 0}}).encode()


VLLM_NO_TEMPLATE = json.dumps({"error": {
    "message": "As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
               "template if the tokenizer does not define one.", "type": "BadRequestError", "code": 400}}).encode()

BROKEN_REPLIES = {
    "empty body": (200, b"", r"answered /chat/completions with an empty body \(HTTP 200\)"),
    "not JSON": (200, b"<html>502 Bad Gateway</html>", r"answered /chat/completions with invalid JSON: <html>"),
    "JSON list": (200, b"[]", r"answered without choices: \[\]"),
    "no choices": (200, b'{"choices": []}', r"answered without choices"),
    "error object": (200, b'{"object": "error", "message": "boom"}', r"answered without choices: .*boom"),
    "completions format": (200, b'{"choices": [{"text": "hello", "index": 0}]}', r"without a message text"),
    "message not object": (200, b'{"choices": [{"message": "hello"}]}', r"without a message text"),
    "content not text": (200, chat_reply(["a", "b"]), r"without a message text"),
    "no chat template": (400, VLLM_NO_TEMPLATE, r"refused a request with HTTP 400: .*must provide a chat template"),
}


@pytest.mark.parametrize("case", list(BROKEN_REPLIES))
def test_broken_server_replies_fail_the_stage_clearly(tmp_path, store_with_history, case):
    status, body, wanted = BROKEN_REPLIES[case]
    before = snapshot(store_with_history)
    with BrokenServer(status, body) as server:
        ctx = StageContext(config=tiny_config(tmp_path), iteration=1, store=store_with_history,
                           endpoint=server.endpoint)
        with pytest.raises(StageError) as err:
            run_stage("respond", ctx)
    message = str(err.value)
    assert message.startswith("stage respond of iteration 1 stopped: inference server " + server.endpoint), message
    assert re.search(wanted, message), message
    assert server.hits <= 4  # not retried: a malformed success is no transient fault
    assert_nothing_lost(store_with_history, before, "respond")


@pytest.mark.parametrize("content", ["", None, "   \n"])
def test_a_server_that_answers_only_empty_text_fails_the_stage(tmp_path, store_with_history, monkeypatch, content):
    """Empty completions are rejected one by one ("empty"); when nothing but empty text comes back for many
    requests in a row, the stage stops with an error naming the model instead of burning hours of requests."""
    monkeypatch.setattr(InferenceClient, "EMPTY_STREAK_LIMIT", 6)
    before = snapshot(store_with_history)
    with BrokenServer(200, chat_reply(content)) as server:
        ctx = StageContext(config=tiny_config(tmp_path), iteration=1, store=store_with_history,
                           endpoint=server.endpoint)
        with pytest.raises(StageError) as err:
            run_stage("respond", ctx)
    message = str(err.value)
    assert "answered the last 6 requests to model 'generator' with empty text" in message, message
    assert "sampling.maxTokens" in message
    assert 6 <= server.hits <= 8  # the limit, and what was in flight when it was reached
    assert_nothing_lost(store_with_history, before, "respond")


def test_malformed_usage_is_no_error(tmp_path, store_with_history):
    """usage only feeds statistics: garbage there must not fail a stage whose answers are fine."""
    for usage in ("many", {"completion_tokens": "7"}, {"completion_tokens": -3}, None):
        body = json.dumps({"choices": [{"message": {"content": "A fine answer."}}], "usage": usage}).encode()
        with BrokenServer(200, body) as server:
            ctx = StageContext(config=tiny_config(tmp_path), iteration=1, store=store_with_history,
                               endpoint=server.endpoint)
            manifest = run_stage("respond", ctx)
        assert manifest["counts"]["accepted"] == 6
        for key in store_with_history.list("bad-input/iter-01/respond"):
            if not key.endswith("/part-00000.jsonl") or "/work/" not in key:
                store_with_history.delete(key)  # run again from the earlier shard only


def test_self_instruct_tallies_empty_completions_as_empty(tmp_path):
    with BrokenServer(200, chat_reply("")) as server:
        ctx = StageContext(config=tiny_config(tmp_path), iteration=1, store=LocalStore(tmp_path / "s"),
                           endpoint=server.endpoint)
        manifest = run_stage("self-instruct", ctx)  # 8 tries in all: below the empty-streak limit
    assert manifest["counts"]["accepted"] == 0
    assert manifest["counts"]["rejected"] == {"empty": 8}


# -- data: a tokenizer without a chat template (training) ------------------------------------------------------------


def test_training_refuses_a_tokenizer_without_a_chat_template(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from selflengthen.pipeline.stages.build_sft import sft_artifacts
    from selflengthen.pipeline.tinymodel import ensure_tiny_model

    model = tmp_path / "no-template"
    shutil.copytree(ensure_tiny_model(), model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    monkeypatch.setenv("SELFLENGTHEN_WORKDIR", str(tmp_path / "work"))

    config = tiny_config(tmp_path, models={"base": str(model)}, training={"maxSteps": 1})
    store = LocalStore(tmp_path / "store")
    ctx = StageContext(config=config, iteration=1, store=store)
    rows = [{"id": "x", "language": "en", "messages": [{"role": "user", "content": "Write."},
                                                       {"role": "assistant", "content": "Done."}]}]
    for role in ("generator", "extender"):
        sft_artifacts(ctx, role).write_outputs(rows, 8)
    ctx.artifacts("build-sft").finish({"counts": {}})
    before = snapshot(store)
    with pytest.raises(StageError, match=rf"the tokenizer of {re.escape(str(model))} has no chat template"):
        run_stage("train-generator", ctx)
    assert snapshot(store) == before  # nothing written, nothing lost


# -- data: the real vLLM server --------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_unknown_model_name_is_named(tmp_path, store_with_history, vllm_endpoint):
    before = snapshot(store_with_history)
    config = tiny_config(tmp_path, models={"generator": "no-such-model"})
    ctx = StageContext(config=config, iteration=1, store=store_with_history, endpoint=vllm_endpoint)
    with pytest.raises(StageError) as err:
        run_stage("respond", ctx)
    message = str(err.value)
    assert f"inference server {vllm_endpoint} does not serve a model named 'no-such-model' (HTTP 404" in message
    assert "models.generator" in message
    assert_nothing_lost(store_with_history, before, "respond")


@pytest.mark.vllm
def test_huge_instruction_is_rejected_for_the_context_and_counted(tmp_path, vllm_endpoint):
    """A seed instruction far longer than the model's context: each try that would carry it is rejected before it
    is sent (reason `context`, counted by the real server's tokenizer) and the stage runs to the end; nothing is
    retried against the server, nothing silently dropped."""
    seed_file = tmp_path / "huge.jsonl"
    seed_file.write_text(json.dumps({"prompt": "Describe " + "everything " * 20_000}) + "\n")
    config = tiny_config(tmp_path, selfInstruct={"seedFile": str(seed_file), "fewShot": 1, "maxTries": 2})
    ctx = StageContext(config=config, iteration=1, store=LocalStore(tmp_path / "fresh"), endpoint=vllm_endpoint)
    manifest = run_stage("self-instruct", ctx)
    counts = manifest["counts"]
    assert counts["accepted"] == 0 and counts["rejected"] == {"context": 2 * counts["requested"]}, counts


# -- names ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../other", "a/b", "..", ".", "", "Run", "run_1", "-run", "run-", "run.1",
                                  "x" * 64, "run/../other", "ü", "run\n"])
def test_run_names_that_would_escape_or_nest_are_refused(name):
    with pytest.raises(ConfigError) as err:
        parse_config({"name": name})
    assert re.search(r"^  name: ", str(err.value), re.M), str(err.value)
    with pytest.raises(ValueError, match="run name"):  # and below the configuration: the store layout itself
        iteration_prefix(name, 1)


def test_iteration_shaped_run_names_are_refused_by_the_layout():
    """A run named iter-01 in a store nested inside another run's prefix would write into that run's
    iteration 1; the layout refuses such names."""
    for name in ("iter-01", "iter-1", "iter-123"):
        with pytest.raises(ValueError, match="reserved"):
            check_run_name(name)
    assert check_run_name("iter-one") == "iter-one" and check_run_name("my-iter-01") == "my-iter-01"


@pytest.mark.parametrize("uri", ["s3://runs/../other", "s3://runs/a/../../b", "s3://runs/..", "s3://UPPER/x",
                                 "s3://ab", "s3:/runs/x", "runs/x", "http://runs/x", "file://"])
def test_storage_uris_that_escape_are_refused(uri):
    with pytest.raises(ConfigError) as err:
        parse_config({"storage": {"uri": uri}})
    assert re.search(r"^  storage\.uri: ", str(err.value), re.M), str(err.value)


@pytest.mark.parametrize("prefix", ["a/./b", "a//b", "a/../b", "..", "./a"])
def test_s3_prefixes_with_dot_or_empty_segments_are_refused(s3_endpoint, prefix):
    with pytest.raises(ValueError, match="invalid S3 prefix"):
        S3Store(BUCKET, prefix, endpoint_url=s3_endpoint)
    with pytest.raises(ValueError, match="invalid S3 prefix"):
        open_store(f"s3://{BUCKET}/{prefix}", s3_endpoint)


def test_runs_whose_names_share_a_prefix_do_not_see_each_other(s3_endpoint, tmp_path):
    """run, run-2 and run2 side by side, on S3 and on disk: each sees only its own shards, outputs and marker."""
    for store in (S3Store(BUCKET, f"names-{os.getpid()}", endpoint_url=s3_endpoint), LocalStore(tmp_path)):
        arts = {name: StageArtifacts(store, name, 1, "respond") for name in ("run", "run-2", "run2")}
        for name, art in arts.items():
            art.write_work(0, [{"run": name}])
            art.write_outputs([{"run": name}], 4)
        arts["run-2"].finish({"counts": {}})
        for name, art in arts.items():
            assert art.read_work(0) == [{"run": name}] and list(art.read_outputs()) == [{"run": name}]
            assert art.work_done() == {0}
            assert art.done() == (name == "run-2")
            assert all(key.startswith(f"{name}/") for key in store.list(name))
        assert store.read("run/iter-01/respond/part-00000.jsonl") == dumps_jsonl([{"run": "run"}])
