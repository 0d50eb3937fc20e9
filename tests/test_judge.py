"""The optional LLM-judge quality score of the evaluate stage: reading scores out of free-text replies, and the
plumbing (prompt, retries, key from the environment, per-item and mean quality in the outputs and manifest)
against deterministic local OpenAI-compatible servers. The tiny model cannot judge, so no real model here."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
from chat_server import ChatServer

from selflengthen.pipeline.config import parse_config
from selflengthen.pipeline.judge import parse_score
from selflengthen.pipeline.stages import StageContext, StageError, run_stage
from selflengthen.pipeline.store import LocalStore


@pytest.mark.parametrize(("reply", "score"), [
    ("Score: 7", 7.0),
    ("score:8", 8.0),
    ("**Score:** 9\nThe answer is coherent.", 9.0),
    ("The answer wanders (Score: N means ...). Overall, Score: 6", 6.0),
    ("Score: 3. On reflection, Score: 4", 4.0),  # the last labelled score is the verdict
    ("Rating: 7/10", 7.0),
    ("I would rate it 8 out of 10.", 8.0),
    ("6.5/10", 6.5),
    ("10", 10.0),
    ("  **5**  ", 5.0),
    ("评分：8", 8.0),
    ("得分为 6", 6.0),
    ("我给这个回答打7分。", 7.0),
    ("Score: 0", None),  # out of range
    ("Score: 11", None),
    ("It is 100/100", None),
    ("The answer has 3 paragraphs and 250 words.", None),
    ("I cannot judge this.", None),
    ("", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


FORMATS = ("Score: {v}", "**Score:** {v}\nGood enough.", "{v}/10", "评分：{v}", "{v}", "Rating: {v} out of 10",
           "Let me think about it.")


def digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def expected(response: str) -> tuple[float | None, int]:
    """What the fake judge means for an answer: (score, asks needed); None: it never gives a score."""
    key = digest(response)
    if key % 5 == 0:
        return None, 2
    return float(1 + key % 10), 2 if FORMATS[key % len(FORMATS)].startswith("Let me") else 1


class Judge:
    """A judge that gives the answer's score in a format picked from the answer; a reply without a score the first
    time is followed by a plain 'Score: v' when asked again; some answers never get one."""

    def __init__(self):
        self.asked: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> str:
        prompt = body["messages"][0]["content"]
        response = prompt.rsplit("[Answer]\n", 1)[-1] if "[Answer]" in prompt else prompt.rsplit("【回答】\n", 1)[-1]
        key = digest(response)
        with self.lock:
            n = self.asked[response] = self.asked.get(response, 0) + 1
        if key % 5 == 0:
            return "I cannot say."
        fmt = FORMATS[key % len(FORMATS)] if n == 1 else "Score: {v}"
        return fmt.format(v=1 + key % 10)


def answer(body: dict) -> str:
    query = body["messages"][0]["content"]
    return " ".join(["word"] * (5 + digest(query) % 40)) + f" ({digest(query) % 997})."


def evaluate_ctx(tmp_path, stage_endpoint: str, **judge) -> StageContext:
    config = parse_config({
        "name": "judged", "iterations": 1, "seed": 3,
        "client": {"concurrency": 4, "deadlineSeconds": 10, "backoffSeconds": 0.01},
        "storage": {"uri": f"file://{tmp_path}/store", "shardSize": 4},
        "evaluate": {"items": 12, "judge": {"enabled": True, **judge}, "longbenchWrite": {"enabled": False},
                     "ruler": {"enabled": False}},
    })
    ctx = StageContext(config=config, iteration=1, store=LocalStore(tmp_path / "store"), endpoint=stage_endpoint)
    ctx.artifacts("train-generator").finish({})
    return ctx


def test_judge_scores_each_answer_on_its_own_endpoint_with_the_key_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test-not-a-secret-123")
    judge = Judge()
    with ChatServer(answer) as generator, ChatServer(judge, models=("grader",)) as judging:
        ctx = evaluate_ctx(tmp_path, generator.endpoint, endpoint=judging.endpoint, model="grader",
                           apiKeyEnv="JUDGE_KEY")
        manifest = run_stage("evaluate", ctx)
        rows = list(ctx.artifacts("evaluate").read_outputs())

        assert len(rows) == 12 and {r["language"] for r in rows} == {"en", "zh"}
        for row in rows:
            score, asks = expected(row["response"])
            assert row["quality"] == score and row["judgeAttempts"] == asks, row["judgeReply"]
        scored = [r["quality"] for r in rows if r["quality"] is not None]
        assert 0 < len(scored) < len(rows)  # the fixture has both kinds
        quality = manifest["quality"]
        assert quality["model"] == "grader" and quality["scored"] == len(scored)
        assert quality["unparsed"] == len(rows) - len(scored)
        assert quality["mean"] == round(sum(scored) / len(scored), 4)
        by_type = {t: [r["quality"] for r in rows if r["type"] == t and r["quality"] is not None]
                   for t in {r["type"] for r in rows}}
        assert quality["byType"] == {t: round(sum(v) / len(v), 4) for t, v in sorted(by_type.items()) if v}

        # The judge got the query and the answer in the language's prompt, deterministically, with the key;
        # the generator's server saw no judge request and no key.
        bodies = judging.bodies("grader")
        assert len(bodies) == sum(r["judgeAttempts"] for r in rows)
        assert all(b["temperature"] == 0 for b in bodies)
        zh = next(r for r in rows if r["language"] == "zh")
        assert any(zh["query"] in b["messages"][0]["content"] and "评分" in b["messages"][0]["content"]
                   for b in bodies)
        assert {r["headers"].get("Authorization") for r in judging.requests} == {"Bearer sk-test-not-a-secret-123"}
        assert not generator.bodies("grader")
        assert all("Authorization" not in r["headers"] for r in generator.requests)
    # The key is in no artifact.
    for key in ctx.store.list("judged"):
        assert b"sk-test-not-a-secret-123" not in ctx.store.read(key)
    assert "sk-test" not in json.dumps(manifest)


def test_judge_on_the_stage_endpoint_when_none_is_given(tmp_path):
    judge = Judge()

    def both(body: dict) -> str:
        return judge(body) if body["model"] == "judge" else answer(body)

    with ChatServer(both, models=("generator", "judge")) as server:
        ctx = evaluate_ctx(tmp_path, server.endpoint)
        manifest = run_stage("evaluate", ctx)
        assert len(server.bodies("judge")) >= 12 and manifest["quality"]["model"] == "judge"


def test_missing_key_variable_fails_the_stage_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with ChatServer(answer) as server:
        ctx = evaluate_ctx(tmp_path, server.endpoint, endpoint=server.endpoint, apiKeyEnv="NO_SUCH_JUDGE_KEY")
        with pytest.raises(StageError, match="evaluate.judge.apiKeyEnv: environment variable NO_SUCH_JUDGE_KEY"):
            run_stage("evaluate", ctx)


def test_judge_is_off_by_default(tmp_path):
    with ChatServer(answer) as server:
        config = parse_config({"name": "plain", "iterations": 1, "storage": {"uri": f"file://{tmp_path}/s"},
                               "evaluate": {"items": 4, "longbenchWrite": {"enabled": False},
                                            "ruler": {"enabled": False}}})
        ctx = StageContext(config=config, iteration=1, store=LocalStore(tmp_path / "s"), endpoint=server.endpoint)
        ctx.artifacts("train-generator").finish({})
        manifest = run_stage("evaluate", ctx)
        assert "quality" not in manifest and len(server.chats()) == 4
        assert all("quality" not in r for r in ctx.artifacts("evaluate").read_outputs())


def test_judge_endpoint_must_be_http():
    from selflengthen.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="evaluate.judge.endpoint: must be an http"):
        parse_config({"evaluate": {"judge": {"endpoint": "judge:8000"}}})
