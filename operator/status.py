"""The SelfLengthenRun status, defined once: the CRD's status schema is generated from these models
(operator/crd.py), and the state machine (operator/reconcile.py) passes every status it emits through
`build_status`, so that a field it writes and the schema lacks fails here, in the unit tests, instead of being
pruned silently by the API server (and an enum value the schema lacks answered 422 for the whole status).

Timestamps are RFC 3339 strings (`YYYY-MM-DDTHH:MM:SSZ`) as the API server stores them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
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


class _Result(_Model):
    # A manifest is data: no inf/NaN reaches the status (JSON has neither).
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", allow_inf_nan=False)


class Overall(_Result):
    overall: float | None = None


class LonGenScores(Overall):
    by_type: dict[str, float] | None = Field(None, max_length=8, description="about, range, above, below")

    @field_validator("by_type", mode="before")
    @classmethod
    def _scored_types(cls, value):
        """A type without items has no score (None in the manifest): left out, as the schema's map has numbers."""
        return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value


class LongBenchWriteScores(_Result):
    sl: Overall | None = Field(None, description="LongWriter's length score S_l (0-100)")
    sq: Overall | None = Field(None, description="The judge's quality score S_q (0-100)")


class RulerResult(_Result):
    max_length: int | None = Field(None, description="LongWrite-Ruler: the longest answer (LongWriter's count)")


class StageResults(_Result):
    """A finished stage's results as its manifest has them: the same keys and nesting, a subset (what the metrics,
    the reports and kubectl read). The metrics read these keys from a local run's manifests and from a cluster
    run's status records alike (pipeline/metrics.py, Metrics.set_iteration)."""

    counts: dict[str, Any] | None = Field(None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
                                          description="The stage manifest's counts")
    average_words: float | None = None
    average_words_initial: float | None = Field(None, description="extend, collect: the initial answers' average")
    final_loss: float | None = Field(None, description="Training: the loss at the last logged step")
    scores: LonGenScores | None = Field(None, description="An evaluation's LonGen length-following scores")
    longbench_write: LongBenchWriteScores | None = None
    ruler: RulerResult | None = None


def stage_results(manifest: dict) -> dict:
    """The results a status record keeps of a stage's manifest (StageResults), camelCase: the keys the result
    models declare (a manifest's sections have more: LonGen's byLanguage, ...); a value of the wrong type, or not
    finite, is left out (the manifest is data; the status must stay writable)."""
    out: dict = {}
    for name, value in _declared(StageResults, manifest).items():
        try:
            parsed = StageResults.model_validate({name: value})
        except ValidationError:
            continue
        out.update(parsed.model_dump(by_alias=True, exclude_none=True))
    return out


def _declared(model: type[BaseModel], value: dict) -> dict:
    """The entries of `value` that `model` declares (by alias), recursively into the result models, by name."""
    out = {}
    for name, field in model.model_fields.items():
        item = value.get(field.alias)
        if item is None:
            continue
        sub = next((t for t in getattr(field.annotation, "__args__", ()) if isinstance(t, type)
                    and issubclass(t, _Result)), None)
        out[name] = _declared(sub, item) if sub is not None and isinstance(item, dict) else item
    return out


class StageRecord(StageResults):
    """One stage (or serving pseudo-stage) of one macro-iteration: its attempts, and its results (StageResults)."""

    state: StageState | None = None
    attempts: int | None = Field(None, ge=0)
    started_at: Timestamp | None = _time()
    finished_at: Timestamp | None = _time()
    next_attempt_at: Timestamp | None = _time("When the next attempt is due (after a failed one's backoff)")
    duration_seconds: float | None = None
    child: str | None = Field(None, description="Job or Deployment of the latest attempt")
    failures: list[Failure] | None = Field(None, max_length=MAX_FAILURES_KEPT)
    stuck: Stuck | None = None
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


def status_schema() -> dict:
    """The CRD's status schema, from these models (operator/openapi.py)."""
    from .openapi import openapi_schema

    return openapi_schema(RunStatus)
