"""What a local run shows a person on stderr while it works (tqdm).

- Each stage of each iteration gets its own line: a spinner with the elapsed time from the stage's start until
  its first count, then a bar of items (or training steps). Lines are fresh per iteration and stage, so a bar never
  starts at an old elapsed time or overflows an old total.
- Long steps without a count (building the model, starting vLLM) get a spinner line saying what they are and
  what they cost the first time.
- Log records are written through tqdm (logging_redirect_tqdm in `Progress.session`), so they never land in the
  middle of a bar.

Silent unless enabled (the runner enables it when stderr is a terminal, or on --progress).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

SPINNER = "|/-\\"
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]"
SPIN_FORMAT = "{desc}: {postfix} {elapsed}"


class _Spinner:
    """A line with a turning mark and the elapsed time, redrawn from a thread until stopped."""

    def __init__(self, desc: str, file, interval: float = 0.25):
        self.bar = tqdm(total=None, desc=desc, bar_format=SPIN_FORMAT, file=file, leave=False, dynamic_ncols=True)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._turn, args=(interval,), daemon=True)
        self.thread.start()

    def _turn(self, interval: float) -> None:
        for mark in itertools.cycle(SPINNER):
            if self.stopped.wait(interval):
                return
            self.bar.set_postfix_str(mark, refresh=True)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.bar.close()


class Progress:
    """Lines of progress for a run of `iterations` macro-iterations; a no-op when not enabled."""

    def __init__(self, enabled: bool, iterations: int = 1, file=None):
        self.enabled = enabled
        self.iterations = iterations
        self.file = file or sys.stderr
        self.iteration = 1
        self.stage: str | None = None
        self.bar: tqdm | None = None
        self.spinner: _Spinner | None = None
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def session(self) -> Iterator[Progress]:
        """Around a whole run: log records go through tqdm's writer while bars may be on screen."""
        if not self.enabled:
            yield self
            return
        with logging_redirect_tqdm():
            try:
                yield self
            finally:
                self.close()

    def label(self, stage: str) -> str:
        return f"iter {self.iteration}/{self.iterations} {stage}"

    def begin(self, iteration: int, stage: str) -> None:
        """A stage starts: its own line, a spinner until its first count."""
        with self.lock:
            self._end()
            self.iteration, self.stage = iteration, stage
            if self.enabled:
                self.spinner = _Spinner(self.label(stage), self.file)

    def __call__(self, stage: str, done: int, total: int) -> None:
        """A stage's count (StageContext.tick): items done of total."""
        if not self.enabled:
            return
        with self.lock:
            if stage != self.stage:  # a count of a stage begun elsewhere (a stage run alone)
                self._end()
                self.stage = stage
            if self.bar is None:
                self._stop_spinner()
                unit = "steps" if stage.startswith("train-") else "items"
                self.bar = tqdm(total=max(total, done), desc=self.label(stage), unit=unit, bar_format=BAR_FORMAT,
                                file=self.file, dynamic_ncols=True)
            if total > (self.bar.total or 0) or done > (self.bar.total or 0):
                self.bar.total = max(total, done)
            self.bar.n = done
            self.bar.refresh()

    def end(self) -> None:
        """The stage is done: its bar stays on screen as it ended; a spinner-only stage leaves no line."""
        with self.lock:
            self._end()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """A long step without a count (model build, server start-up): a spinner line while it runs."""
        if not self.enabled:
            yield
            return
        with self.lock:
            self._stop_spinner()
            spinner = self.spinner = _Spinner(what, self.file)
        try:
            yield
        finally:
            with self.lock:
                if self.spinner is spinner:
                    self._stop_spinner()

    def close(self) -> None:
        with self.lock:
            self._end()

    def _stop_spinner(self) -> None:
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None

    def _end(self) -> None:
        self._stop_spinner()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.stage = None
