"""What a person sees in a terminal: `selflengthen run` of a two-iteration run in a pseudo-terminal (a real tty, so
the real tqdm bars are drawn), against a scripted chat server on loopback and with real training of the tiny model.
The output stays well-formed: a fresh line per stage of each iteration, no count above its total, every finished
stage's bar full, log records on lines of their own (never glued onto a bar); a rerun says the run is complete."""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest
import yaml
from chat_server import ChatServer

from selflengthen.pipeline.tinymodel import ensure_tiny_model

WORDS = ("river stone lamp harbor garden window letter winter music bridge forest candle meadow "
         "journey signal orchard lantern valley").split()
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LOG = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")
BAR = re.compile(r"^iter (\d)/2 (\S+): +(\d+)%\|.*\| (\d+)/(\d+) (items|steps) \[(\d\d:\d\d)")


def text(seed: int, words: int) -> str:
    sentence = [WORDS[(seed + i * 7) % len(WORDS)] for i in range(words)]
    return " ".join(sentence).capitalize() + "."


def reply(body: dict) -> str:
    seed = int(hashlib.sha256(repr(body["messages"]).encode()).hexdigest()[:8], 16)
    last = body["messages"][-1]
    if body.get("continue_final_message"):  # the extension's forced prefix: continue it, longer
        return "\n\n" + text(seed, 40)
    if last["role"] == "assistant":
        return " Write a long essay about " + " ".join(WORDS[seed % 9: seed % 9 + 4]) + "."
    return text(seed, 20 + seed % 10) + "\n\n" + text(seed + 1, 15)


def run_in_pty(args: list[str], cwd, env) -> tuple[int, str]:
    """Run a command with a pseudo-terminal (120 columns) as its stdin/stdout/stderr; its exit code and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, start_new_session=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def segments(output: str) -> list[str]:
    """What the terminal shows, piece by piece: escape sequences dropped, split at every carriage return and
    line feed (a bar redraws itself after a carriage return)."""
    return [s for s in re.split(r"[\r\n]", ANSI.sub("", output)) if s.strip()]


@pytest.fixture(scope="module")
def server():
    with ChatServer(reply) as s:
        yield s


def test_a_two_iteration_run_draws_well_formed_progress_in_a_terminal(tmp_path, server):
    ensure_tiny_model()  # built once for the whole suite (its build line is the runner's, not tested here)
    config = {
        "name": "pty", "iterations": 2, "seed": 3, "models": {"endpoint": server.endpoint},
        "selfInstruct": {"instructionsPerIteration": 12, "maxTries": 2, "judge": False, "maxSimilarity": 1.0},
        "respond": {"samplesPerInstruction": 2, "maxRetries": 2},
        "extend": {"attempts": 1, "passes": 1, "maxRetries": 1},
        "filters": {"checkEnding": False, "checkMeta": False, "enNgram": 0, "dropShort": False},
        "client": {"concurrency": 4, "backoffSeconds": 0.01, "deadlineSeconds": 20},
        "storage": {"uri": f"file://{tmp_path}/store", "shardSize": 4},
        "training": {"maxSteps": 3, "cutoffTokens": 1024, "saveSteps": 100},
        "evaluate": {"items": 4, "maxTokens": 32},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "SELFLENGTHEN_WORKDIR": str(tmp_path / "work"), "PYTHONSAFEPATH": "1", "TERM": "xterm"}
    command = [sys.executable, "-m", "selflengthen", "run", str(path)]  # stderr is the tty: bars on by default

    code, output = run_in_pty(command, tmp_path, env)
    shown = segments(output)
    assert code == 0, output[-3000:]
    assert "Traceback" not in output

    bars: dict[tuple[int, str], list[tuple[int, int, str]]] = {}
    for piece in shown:
        log = LOG.search(piece)
        assert log is None or log.start() == 0, f"a log record glued onto other output: {piece!r}"
        if (m := BAR.match(piece)) is not None:
            iteration, stage, n, total = int(m[1]), m[2], int(m[4]), int(m[5])
            assert n <= total, f"a count above its total: {piece!r}"
            bars.setdefault((iteration, stage), []).append((n, total, m[7]))
        elif "|" in piece and "%|" in piece:
            pytest.fail(f"a bar that is not one stage of one iteration: {piece!r}")

    # A fresh bar for every counted stage of every iteration, each ending full.
    counted = ("self-instruct", "respond", "extend", "train-generator", "train-extender", "evaluate")
    assert set(bars) == {(k, s) for k in (1, 2) for s in counted}, sorted(bars)
    for key, states in bars.items():
        n, total, _ = states[-1]
        assert n == total > 0, (key, states)
        elapsed = [60 * int(e[:2]) + int(e[3:]) for _, _, e in states]
        assert elapsed == sorted(elapsed), (key, states)  # a bar's clock never jumps back (it is one bar)
    assert bars[(2, "train-generator")][-1][1] == 3  # steps, of this stage's own total

    code, again = run_in_pty(command, tmp_path, env)
    assert code == 0 and "run pty is already complete (2 iterations, every stage done): nothing to do" in again
    assert not any(BAR.match(p) for p in segments(again))
