"""The SelfLengthenRun status, defined once: the CRD's status schema is generated from these models
(operator/crd.py), and the state machine (operator/reconcile.py) passes every status it emits through
`build_status`, so that a field it writes and the schema lacks fails here, in the unit tests, instead of being
pruned silently by the API server (and an enum value the schema lacks answered 422 for the whole status).

Timestamps are RFC 3339 strings (`YYYY-MM-DDTHH:MM:SSZ`) as the API server stores them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Serving", "Generating", "ScalingDown", "Training", "Evaluating", "Suspended",
                "Succeeded", "Failed"]
# Retrying: a failed attempt's record while the next attempt waits for its backoff (nextAttemptAt).
StageState = Literal["Pending", "Running", "Retrying", "Succeeded", "Failed", "Skipped"]
Timestamp = str
_TIME = {"format": "date-time"}
MAX_MESSAGE = 1024
MAX_FAILURES_KEPT = 5
MAX_ITERATIONS = 100  # RunConfig.iterations' bound
MAX_STAGES = 16  # stage records of one iteration (the stages and the serving pseudo-stages)


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def _time(description: str | None = None):
    return Field(None, json_schema_extra=_TIME, description=description)


class Condition(_Model):
    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str | None = Field(None, max_length=1024)
    message: str | None = Field(None, max_length=32768)
    last_transition_time: Timestamp | None = _time()
    observed_generation: int | None = Field(None, ge=0)


class Failure(_Model):
    """One failed attempt of a stage."""

    attempt: int | None = None
    reason: str | None = None
    message: str | None = Field(None, max_length=MAX_MESSAGE)
    time: Timestamp | None = _time()


class Stuck(_Model):
    """A pod of the stage's child that cannot start (condition Degraded shows it; Failed after
    deadlines.stuckSeconds)."""

    reason: str | None = Field(None, max_length=128, description="ImagePullBackOff, Unschedulable, FailedCreate, ...")
    message: str | None = Field(None, max_length=MAX_MESSAGE)
    since: Timestamp | None = _time("When it was first seen stuck")


class StageRecord(_Model):
    """One stage (or serving pseudo-stage) of one macro-iteration."""

    state: StageState | None = None
    attempts: int | None = Field(None, ge=0)
    started_at: Timestamp | None = _time()
    finished_at: Timestamp | None = _time()
    next_attempt_at: Timestamp | None = _time("When the next attempt is due (after a failed one's backoff)")
    duration_seconds: float | None = None
    child: str | None = Field(None, description="Job or Deployment of the latest attempt")
    failures: list[Failure] | None = Field(None, max_length=MAX_FAILURES_KEPT)
    stuck: Stuck | None = None
    counts: dict[str, Any] | None = Field(None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
                                          description="The stage manifest's counts")
    average_words: float | None = None
    train_loss: float | None = None
    score: float | None = None
    longbench_sl: float | None = Field(None, description="An evaluation's LongBench-Write length score S_l (0-100)")
    max_output_length: int | None = Field(None, description="An evaluation's LongWrite-Ruler maximum output length")
    artifact_uri: str | None = None


class IterationRecord(_Model):
    iteration: int | None = None
    started_at: Timestamp | None = _time()
    finished_at: Timestamp | None = _time()
    average_words: float | None = None
    stages: dict[str, StageRecord] | None = Field(None, max_length=MAX_STAGES)


class LastFailure(_Model):
    iteration: int | None = None
    stage: str | None = None
    attempt: int | None = None
    reason: str | None = None
    message: str | None = Field(None, max_length=MAX_MESSAGE)
    time: Timestamp | None = _time()


class Rejection(_Model):
    """A child the API server refused to create (admission or validation), until it is created."""

    kind: str
    name: str
    code: int = Field(description="HTTP status of the refusal")
    reason: str | None = None
    message: str | None = Field(None, max_length=MAX_MESSAGE)
    time: Timestamp | None = _time()
    generation: int | None = Field(None, description="metadata.generation of the spec the refusal was for")


class RunStatus(_Model):
    """What the operator reports of a run (written by the operator only, through the status subresource)."""

    phase: Phase | None = None
    current_iteration: int | None = None
    iterations: int | None = Field(None, description="spec.iterations as last seen")
    progress: str | None = Field(None, description="k/N for kubectl get")
    stage: str | None = None
    average_words: int | None = Field(None, description="Average words of the latest extended responses")
    observed_generation: int | None = None
    started_at: Timestamp | None = _time()
    finished_at: Timestamp | None = _time()
    endpoint: str | None = Field(None, description="The inference Service the data stages use")
    failure_message: str | None = Field(None, max_length=MAX_MESSAGE, description="Why the run failed")
    conditions: list[Condition] | None = Field(None, max_length=8, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    history: list[IterationRecord] | None = Field(None, max_length=MAX_ITERATIONS, description="Per-iteration records")
    last_failure: LastFailure | None = None
    rejection: Rejection | None = Field(None, description="A child the API server refused (condition Degraded, "
                                        "reason ChildRejected)")


def build_status(status: dict) -> dict:
    """The status as the API server will store it: validated against the model (a field or value the CRD does not
    declare raises), unset fields left out, camelCase."""
    return RunStatus.model_validate(status).model_dump(by_alias=True, exclude_none=True)
