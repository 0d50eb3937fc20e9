"""The Job controller's handling of failed pods, as Kubernetes 1.31+ does it (pkg/controller/job/pod_failure_policy.go
and the batch API's validation), for tests of the Jobs the operator makes.

- `validate(job)`: what the API server refuses in a Job's podFailurePolicy (beyond the OpenAPI schema, which
  kubernetes-validate checks): restartPolicy Never, one of onExitCodes/onPodConditions per rule, exit-code lists
  unique, sorted, 0 not under In, container names that exist, FailIndex only with backoffLimitPerIndex,
  podReplacementPolicy Failed.
- `action(job, pod)`: the rule that applies to a failed pod (the first that matches), or "Count" when none does.
- `job_failed(job, pods)`: whether the Job fails: a FailJob rule matched, or the pods that count exceed backoffLimit.
"""

from __future__ import annotations


class Invalid(ValueError):
    pass


def validate(job: dict) -> None:
    spec = job["spec"]
    policy = spec.get("podFailurePolicy")
    if policy is None:
        return
    pod = spec["template"]["spec"]
    if pod.get("restartPolicy") != "Never":
        raise Invalid("spec.template.spec.restartPolicy: only Never is supported with podFailurePolicy")
    if spec.get("podReplacementPolicy", "Failed") != "Failed":
        raise Invalid("spec.podReplacementPolicy: must be Failed when podFailurePolicy is set")
    names = {c["name"] for c in [*pod.get("initContainers", []), *pod["containers"]]}
    rules = policy.get("rules") or []
    if len(rules) > 20:
        raise Invalid("spec.podFailurePolicy.rules: at most 20")
    for i, rule in enumerate(rules):
        where = f"spec.podFailurePolicy.rules[{i}]"
        if rule.get("action") not in ("FailJob", "FailIndex", "Ignore", "Count"):
            raise Invalid(f"{where}.action: unsupported {rule.get('action')!r}")
        if rule["action"] == "FailIndex" and spec.get("backoffLimitPerIndex") is None:
            raise Invalid(f"{where}.action: FailIndex needs backoffLimitPerIndex")
        if ("onExitCodes" in rule) == ("onPodConditions" in rule):
            raise Invalid(f"{where}: exactly one of onExitCodes and onPodConditions")
        codes = rule.get("onExitCodes")
        if codes is not None:
            if codes.get("operator") not in ("In", "NotIn"):
                raise Invalid(f"{where}.onExitCodes.operator: In or NotIn")
            values = codes.get("values") or []
            if not 1 <= len(values) <= 255 or values != sorted(set(values)):
                raise Invalid(f"{where}.onExitCodes.values: 1 to 255 unique values, in increasing order")
            if codes["operator"] == "In" and 0 in values:
                raise Invalid(f"{where}.onExitCodes.values: 0 is not allowed with In")
            if codes.get("containerName") is not None and codes["containerName"] not in names:
                raise Invalid(f"{where}.onExitCodes.containerName: no container {codes['containerName']!r}")
        for j, pattern in enumerate(rule.get("onPodConditions") or []):
            if pattern.get("status", "True") not in ("True", "False", "Unknown"):
                raise Invalid(f"{where}.onPodConditions[{j}].status: True, False or Unknown")
            if not pattern.get("type"):
                raise Invalid(f"{where}.onPodConditions[{j}].type: required")


def action(job: dict, pod: dict) -> str:
    """The action of the first rule matching a failed pod; "Count" when no rule matches (or there is no policy)."""
    status = pod.get("status") or {}
    assert status.get("phase") == "Failed", "the policy applies to failed pods only"
    for rule in (job["spec"].get("podFailurePolicy") or {}).get("rules") or []:
        codes = rule.get("onExitCodes")
        if codes is not None:
            for c in [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]:
                terminated = (c.get("state") or {}).get("terminated")
                if terminated is None or terminated.get("exitCode", 0) == 0:
                    continue
                if codes.get("containerName") not in (None, c["name"]):
                    continue
                if (terminated["exitCode"] in codes["values"]) == (codes["operator"] == "In"):
                    return rule["action"]
        for pattern in rule.get("onPodConditions") or []:
            if any(cond.get("type") == pattern["type"] and cond.get("status") == pattern.get("status", "True")
                   for cond in status.get("conditions") or []):
                return rule["action"]
    return "Count"


def job_failed(job: dict, pods: list[dict]) -> bool:
    actions = [action(job, p) for p in pods]
    return "FailJob" in actions or actions.count("Count") > job["spec"].get("backoffLimit", 6)
