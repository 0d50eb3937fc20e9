"""The stage table (pipeline/stage_table.py) is the one list of stages: every module of pipeline/stages/ that is a
stage is in it under its NAME, nothing else there looks like one, and the modules that read it do not import the
stages package (the import cycle metrics <-> stages is gone)."""

from __future__ import annotations

import importlib
from pathlib import Path

from selflengthen.pipeline import stage_table
from selflengthen.pipeline.stages import RUN_STAGES, STAGES

from conftest import imported_by

STAGES_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "stages"
SHARED = {"__init__", "common"}  # what the stages share: not stages


def test_every_stage_module_is_in_the_table_under_its_name():
    modules = {p.stem for p in STAGES_DIR.glob("*.py")} - SHARED
    assert modules == {s.module for s in stage_table.TABLE}
    for entry in stage_table.TABLE:
        module = importlib.import_module(f"selflengthen.pipeline.stages.{entry.module}")
        assert module.NAME == entry.name and callable(module.run)
    assert STAGES == {s.name: s.module for s in stage_table.TABLE}


def test_table_entries_say_what_each_stage_is_served():
    served = {s.name: (s.roles, s.models) for s in stage_table.TABLE if s.served}
    assert served == {"self-instruct": (("base",), "previous"), "respond": (("generator",), "previous"),
                      "extend": (("extender",), "previous"), "evaluate": (("generator",), "current"),
                      "collect": (("generator", "extender"), "current"),
                      "evaluate-length-following": (("generator",), "length-following")}
    assert all(s.models is None for s in stage_table.TABLE if not s.served)
    assert RUN_STAGES == ("collect", "train-length-following", "evaluate-length-following")
    assert {s.phase for s in stage_table.TABLE} == {"Generating", "Training", "Evaluating"}


def test_metrics_import_without_the_stages_package():
    loaded = imported_by(["selflengthen.pipeline.metrics"])
    assert "selflengthen.pipeline.stage_table" in loaded and "selflengthen.pipeline.stages" not in loaded
