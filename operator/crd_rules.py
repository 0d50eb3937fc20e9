"""The CRD's CEL rules (x-kubernetes-validations): what a schema cannot say of a spec — fields across sections,
fields that may not change once a run has started, strings that would fail at run time or leak a key — and of the
object's name. The API server runs them on admission; the operator runs the same rules on every spec it acts on
(operator/validation.py, spec_rule_errors); operator/celcheck.py checks them as the API server does on install.
"""

from __future__ import annotations

from .openapi import add_rules, rule
from .spec import ALL_STAGES, MAX_RUN_NAME, RESERVED_VLLM_FLAGS, SERVING

IMMUTABLE = "is immutable once the run has started: create a new SelfLengthenRun instead"
# Fields of the run configuration that may not change once the run exists (the artifacts already made depend on
# them); everything else (iterations excepted: it may only grow) may be tuned on a running run.
IMMUTABLE_FIELDS = ("models", "languages", "seed", "sampling", "selfInstruct", "respond", "extend", "filters")


def add_spec_rules(schema: dict) -> None:
    """The spec's rules, added to its schema (operator/crd.py, spec_schema)."""
    props = schema["properties"]
    uri = props["storage"]["properties"]["uri"]
    add_rules(
        uri,
        rule("self.startsWith('s3://')", "must be s3://BUCKET[/PREFIX]: pods share no disk, artifacts go to S3"),
        rule("!self.startsWith('s3://') || self.matches('^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$')",
              "must be s3://BUCKET[/PREFIX] with a valid bucket name"),
        rule("!self.contains('/../') && !self.endsWith('/..')", "must not contain '..' segments"),
        rule("self == oldSelf", IMMUTABLE),
    )

    for key in IMMUTABLE_FIELDS:
        add_rules(props[key], rule("self == oldSelf", IMMUTABLE))
    add_rules(props["iterations"], rule("self >= oldSelf", "may only grow once the run has started"))
    add_rules(props["training"]["properties"]["mode"], rule("self == oldSelf", IMMUTABLE))
    add_rules(props["training"]["properties"]["lora"], rule("self == oldSelf", IMMUTABLE))

    si = props["selfInstruct"]
    add_rules(si, rule("self.minWords < self.maxWords - 1",
                         "minWords must be at least 2 below maxWords (both bounds are exclusive)",
                         fieldPath=".minWords"))
    add_rules(props["models"]["properties"]["base"], rule(
        "!self.startsWith('tiny://') && !self.startsWith('smollm2://') && !self.startsWith('gguf://')",
        "tiny://, smollm2:// and gguf:// models exist on a laptop only: name a real model (e.g. "
        "Qwen/Qwen2-7B-Instruct)"))

    for section in ("inference", "training"):
        res = props[section]
        add_rules(res, rule(
            "(!has(self.resources.requests) || !(self.gpuResource in self.resources.requests)) && "
            "(!has(self.resources.limits) || !(self.gpuResource in self.resources.limits))",
            "resources must not set the GPU resource: GPUs follow from "
            + ("tensorParallelSize" if section == "inference" else "processesPerNode"),
            fieldPath=".resources"))
    add_rules(props["inference"]["properties"]["extraArgs"], rule(
        f"self.all(a, !a.matches('{_flag_regex(RESERVED_VLLM_FLAGS)}'))",
        "must not repeat flags the operator sets (" + ", ".join(RESERVED_VLLM_FLAGS) + "), in any spelling"))
    stages = "[" + ", ".join(f"'{s}'" for s in (SERVING, *ALL_STAGES)) + "]"
    add_rules(props["retry"]["properties"]["stages"], rule(
        f"self.all(k, k in {stages})", "keys must be stage names: " + ", ".join((SERVING, *ALL_STAGES))))
    job_stages = "[" + ", ".join(f"'{s}'" for s in ALL_STAGES) + "]"
    add_rules(props["deadlines"]["properties"]["stages"], rule(
        f"self.all(k, k in {job_stages})", "keys must be the names of stages that run as Jobs: "
        + ", ".join(ALL_STAGES)))
    add_rules(props["retry"], rule(
        "self.maxBackoffSeconds >= self.backoffSeconds", "maxBackoffSeconds must not be below backoffSeconds",
        fieldPath=".maxBackoffSeconds"))
    for section in ("scheduling", "inference", "training", "cpuJobs"):  # every role's tolerations
        tol = props[section]["properties"]["tolerations"]["items"]
        add_rules(tol, rule("self.operator != 'Exists' || !has(self.value)",
                              "a toleration with operator Exists must not have a value"),
                   rule("has(self.key) || self.operator == 'Exists'",
                         "a toleration without a key must use operator Exists"),
                   rule("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                         "tolerationSeconds only with effect NoExecute", fieldPath=".tolerationSeconds"))
    add_rules(schema, rule(
        "!has(self.training) || !has(self.training.mode) || self.training.mode != 'full' || !has(self.inference) "
        "|| !has(self.inference.port) || self.inference.port <= 65533",
        "inference.port: at most 65533 with training.mode full (the Generator's, the Extender's and the base "
        "model's servers listen on port, port+1 and port+2)", fieldPath=".inference.port"))
    _hostile_input_rules(props)


def root_rules() -> list[dict]:
    """The object's own rules (its name: it prefixes the names of its children)."""
    return [
        rule(f"self.metadata.name.size() <= {MAX_RUN_NAME}",
             f"metadata.name must be at most {MAX_RUN_NAME} characters (it prefixes the names of Jobs, "
             "Services and pod hostnames)"),
        rule("!self.metadata.name.matches('^iter-[0-9]+$')",
             "metadata.name: names of the form iter-NN are reserved (they name the iterations inside a run)"),
        rule("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
             "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a "
             "letter): it names Services"),
    ]


# The apiserver's share of pipeline/config.py's and pipeline/urls.py's checks of strings that would fail at run
# time or leak a key (RE2 regexes in double-quoted CEL strings, without backslashes).
_URL_RE = "^https?://[A-Za-z0-9.:-]+(/[A-Za-z0-9._~!&'()*+,;=:/%-]*)?$"


def _url_rules(field: str, home: str) -> list[dict]:
    return [
        rule("!self.contains('@')", f"must not contain credentials (user:password@): a key belongs in {home}, "
              "never in the URL"),
        rule("!self.contains('?') && !self.contains('#')", "must not have a query string or fragment"),
        rule(f'self.matches("{_URL_RE}")', f"{field} must be an http:// or https:// URL without spaces or line "
              "breaks"),
    ]


def _flag_regex(flags) -> str:
    """An RE2 regex for every spelling of these vLLM flags vLLM's parser accepts that a regex can see: '-' or '_'
    in the name, `=value` or `.field`, the short aliases (abbreviations are left to the operator's own check)."""
    from ..pipeline.vllm_flags_table import OPTIONS

    dests = {OPTIONS[f]["dest"] for f in flags}
    longs = sorted({o[2:].replace("-", "[-_]") for o, v in OPTIONS.items() if v["dest"] in dests and o[:2] == "--"})
    shorts = sorted({o for o, v in OPTIONS.items() if v["dest"] in dests and o[:2] != "--"})
    return "^(--(" + "|".join(longs) + ")" + "".join(f"|{s}" for s in shorts) + ")([=.].*)?$"


def _hostile_input_rules(props: dict) -> None:
    from ..pipeline.urls import KEY_HOME

    storage = props["storage"]["properties"]
    add_rules(storage["uri"],
               rule("!self.contains('?') && !self.contains('#') && !self.contains('@')",
                     "must be s3://BUCKET/PREFIX without a query string, fragment or '@' (credentials come from "
                     "the AWS variables)"),
               rule("!self.matches('^s3://.*/[.]{0,2}/') && !self.matches('/[.]{1,2}/?$')",
                     "must not contain '.', '..' or empty segments (each would name another prefix)"))
    add_rules(storage["endpointUrl"], *_url_rules("storage.endpointUrl", KEY_HOME["storage.endpointUrl"]))
    judge = props["evaluate"]["properties"]["judge"]["properties"]["endpoint"]
    add_rules(judge, *_url_rules("evaluate.judge.endpoint", KEY_HOME["evaluate.judge.endpoint"]))
    add_rules(props["inference"]["properties"]["extraArgs"], rule(
        f"self.all(a, !a.matches('{_flag_regex(('--api-key', '--hf-token', '--config'))}'))",
        "must not pass keys (--api-key, --hf-token) or an options file (--config): keys come from Secrets"))
    for node in (props["models"]["properties"]["base"], props["inference"]["properties"]["model"]):
        add_rules(node, rule("!self.startsWith('-')", "must not begin with '-' (vLLM would read it as a flag)"))
    # targetModules: typed as a list with minItems 1 (no rule needed to refuse an empty one)
