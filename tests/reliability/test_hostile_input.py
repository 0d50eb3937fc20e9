"""Hostile input: refused at load or validation time, in one line naming the place, never with a traceback, never
echoing a megabyte back, never hanging.

tests/hostile/ holds the corpus: each file with the command that reads it and the refusal it must get
(cases.json). The properties (hypothesis) cover what the corpus cannot list.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kube_expansion import container_environment, expand, expanded_argv, mapping_func_for

from selflengthen.cli import main as cli_main
from selflengthen.pipeline.config import ConfigError, load_config, parse_config
from selflengthen.pipeline.urls import redact, redact_log_records
from selflengthen.pipeline.yamlfile import MAX_BYTES, YAMLFileError, dump, parse_documents

CORPUS = Path(__file__).parent.parent / "hostile"
CASES = json.loads((CORPUS / "cases.json").read_text())
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli_main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_the_corpus_lists_every_file():
    assert sorted(CASES) == sorted(p.name for p in CORPUS.iterdir() if p.name != "cases.json")


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_files_get_their_refusal(name, capsys):
    case = CASES[name]
    path = str(CORPUS / name)
    rc, output = run_cli([*case["command"].split(), path], capsys)
    assert rc != 0, output
    assert re.search(case["refusal"], output), output
    assert "Traceback" not in output
    assert all(len(line) < 500 for line in output.splitlines()), output
    if "secret" in case:  # a key in a refused URL is not echoed back
        assert case["secret"] not in output, output
    if not case["refusal"].startswith(":"):  # refused by validation: nothing of the loader's kind of line
        return
    # a load error is one line: FILE:LINE:COLUMN: what
    (line,) = [line for line in output.splitlines() if path in line]
    assert re.search(rf"{re.escape(path)}{case['refusal']}", line), line


def test_a_missing_file_is_refused_naming_it(tmp_path, capsys):
    for command in (["validate"], ["operator", "validate"]):
        rc, output = run_cli([*command, str(tmp_path / "absent.yaml")], capsys)
        assert rc != 0 and f"{tmp_path / 'absent.yaml'}: cannot read" in output and "Traceback" not in output


def test_a_file_larger_than_the_limit_is_refused_unread(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"name: " + b"x" * (10 * MAX_BYTES) + b"\n")
    for command in (["validate"], ["operator", "validate"]):
        rc, output = run_cli([*command, str(path)], capsys)
        assert rc != 0 and f"{path}:1:1: more than the {MAX_BYTES} bytes" in output


@pytest.mark.parametrize("field", ["name", "models.base", "storage.uri", "sampling.stop"])
def test_a_megabyte_value_is_not_echoed_back(tmp_path, capsys, field):
    section, _, key = field.rpartition(".")
    value = "X" * (MAX_BYTES - 1000)
    value = [value] * 1 if field == "sampling.stop" else value
    path = tmp_path / "big.yaml"
    path.write_text(dump({section: {key: value}} if section else {key: value}), encoding="utf-8")
    rc, output = run_cli(["validate", str(path)], capsys)
    if rc == 0:  # some fields take any string: then it is the validation's business, not the echo's
        return
    assert output.count("X") <= 200 and len(output) < 2000, output[:3000]


def test_operator_validate_does_not_echo_a_megabyte_value(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    run = {"apiVersion": "selflengthen.io/v1alpha1", "kind": "SelfLengthenRun", "metadata": {"name": "x" * 500_000},
           "spec": {"image": "Y" * 500_000}}
    path.write_text(dump(run), encoding="utf-8")
    rc, output = run_cli(["operator", "validate", str(path)], capsys)
    assert rc != 0 and output.count("x") <= 400 and output.count("Y") <= 200 and len(output) < 4000, output[:3000]


# -- properties ---------------------------------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80),
                    st.floats(allow_nan=False), st.text(max_size=12),
                    st.sampled_from(["0o17", "0x1F", "1:30", "2024-01-01", "yes", "No", "~", "null", ".inf", "1e3",
                                     "1_000", "+1", ".5", "<<", "=", "true", "-", "!!str", "&a", "*a"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=20)


@PROPERTY
@given(VALUES)
def test_what_we_dump_reads_back_as_the_same_values(value):
    assert parse_documents(dump(value, allow_unicode=True)) == [value]


HOSTILE_PIECES = st.sampled_from([
    "a: ", "- ", "&x ", "*x ", "*y", "&y [", "{", "}", "[", "]", ", ", "? ", ": ", "\n", "  ", "\t", "!!python/name:x ",
    "!!binary ", "!custom ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!str ", "'", '"', "#", "---\n", "...\n",
    "%YAML 1.1\n", "<<: ", "1:30", "2024-01-01", "9" * 80, "x", "\u2028", "\x00", "\ufeff", "|\n", ">-\n",
])
HOSTILE = st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode),
                    st.lists(HOSTILE_PIECES, max_size=40).map(lambda parts: "".join(parts).encode("utf-8", "replace")))


def _limits_hold(value, depth=0) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) for k in value) and all(_limits_hold(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return depth < 64 and all(_limits_hold(v, depth + 1) for v in value)
    return value is None or isinstance(value, (str, bool, int, float))


@PROPERTY
@given(HOSTILE)
def test_the_loader_returns_plain_values_or_refuses_in_one_line(data):
    try:
        documents = parse_documents(data, "in.yaml")
    except YAMLFileError as err:
        assert re.match(r"^in\.yaml:\d+:\d+: \S[^\n]*$", str(err)), str(err)
        assert len(str(err)) < 400
        return
    for document in documents:
        assert _limits_hold(document), document
        if isinstance(document, float) and math.isnan(document):
            continue


@PROPERTY
@given(HOSTILE)
def test_every_entry_point_refuses_hostile_files_without_a_traceback(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("hostile") / "in.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as err:
        first = str(err).splitlines()[0]
        assert first.startswith((f"{path}:", "invalid run configuration")), first
    from selflengthen.operator.cli import main as operator_main

    assert operator_main(["validate", str(path)]) in (0, 1)


MANIFEST_VALUES = st.recursive(
    st.one_of(SCALARS, st.sampled_from(["SelfLengthenRun", "selflengthen.io/v1alpha1", "s3://b/p", "img:1"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
        st.sampled_from(["metadata", "name", "spec", "image", "models", "base", "storage", "uri", "kind",
                         "inference", "extraArgs", "x"]), inner, max_size=4)),
    max_leaves=16)


@PROPERTY
@given(MANIFEST_VALUES, MANIFEST_VALUES)
def test_operator_validate_answers_any_document_shape(tmp_path_factory, metadata, spec):
    path = tmp_path_factory.mktemp("manifest") / "run.yaml"
    path.write_text(dump({"apiVersion": "selflengthen.io/v1alpha1", "kind": "SelfLengthenRun",
                          "metadata": metadata, "spec": spec}), encoding="utf-8")
    from selflengthen.operator.cli import main as operator_main

    assert operator_main(["validate", str(path)]) == 1  # never valid: spec.image and more are missing or wrong


# -- secrets in URLs -----------------------------------------------------------------------------------------------

SECRET = st.text(alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~"),
                 min_size=12, max_size=40)


@PROPERTY
@given(SECRET, SECRET, st.sampled_from(["http", "https", "s3", "postgres"]),
       st.sampled_from(["", "error: ", "cannot reach ", "(", "'", '"', "url="]))
def test_redact_leaves_no_userinfo_or_query_of_any_url(user_key, query_key, scheme, before):
    text = (f"{before}{scheme}://user:{user_key}@host.example:8000/v1/models?api_key={query_key}&x=1 failed; "
            f"also {scheme}://{user_key}@other/p#frag={query_key}")
    out = redact(text)
    assert user_key not in out and query_key not in out, out
    assert "host.example:8000/v1/models" in out and out.startswith(before)


def test_redact_keeps_urls_without_secrets():
    text = "GET http://vllm.ml.svc:8000/v1/chat/completions failed: 503 (s3://bucket/runs/demo/iter-01)"
    assert redact(text) == text


@pytest.mark.parametrize("field, url, home", [
    ("models.endpoint", "https://u:s3cr3tvalue@h/v1", "models.apiKeyEnv"),
    ("models.endpoint", "https://s3cr3tvalue@h/v1", "models.apiKeyEnv"),
    ("models.endpoint", "http://h:8000/v1?key=s3cr3tvalue", "models.apiKeyEnv"),
    ("evaluate.judge.endpoint", "https://u:s3cr3tvalue@judge/v1", "evaluate.judge.apiKeyEnv"),
    ("storage.endpointUrl", "http://ID:s3cr3tvalue@minio:9000", "AWS_SECRET_ACCESS_KEY"),
])
def test_urls_with_credentials_are_refused_saying_where_the_key_belongs(field, url, home):
    *sections, leaf = field.split(".")
    data: dict = {leaf: url}
    for section in reversed(sections):
        data = {section: data}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    message = str(err.value)
    assert f"  {field}: must not" in message and home in message and "s3cr3tvalue" not in message


def test_an_endpoint_given_as_a_flag_is_validated_like_the_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("name: flagged\n")
    rc, output = run_cli(["validate", str(path)], capsys)
    assert rc == 0
    for argv in (["run", str(path), "--endpoint", "https://u:sk-flag-secret@h/v1"],
                 ["stage", "respond", "--config", str(path), "--iteration", "1", "--endpoint", "http://h/v1?k=sk-flag"]):
        rc, output = run_cli(argv, capsys)
        assert rc == 2 and "models.endpoint: must not" in output and "sk-flag" not in output, output


def test_log_lines_and_operator_messages_are_redacted(caplog):
    import logging

    from selflengthen.operator.reconcile import _truncate

    redact_log_records()
    with caplog.at_level(logging.INFO):
        logging.getLogger("selflengthen.test").warning("request to %s failed", "https://u:sk-log-secret@h/v1?t=sk-q")
    assert "sk-log-secret" not in caplog.text and "sk-q" not in caplog.text and "https://***@h/v1?***" in caplog.text
    # status.lastFailure, failureMessage and Events all go through this
    assert "sk-op" not in _truncate("error: cannot reach http://x:sk-op@h:8000/v1 (refused)")


# -- no $(VAR) expansion of user strings ---------------------------------------------------------------------------


def test_the_expansion_helper_follows_the_kubelet():
    m = mapping_func_for({"A": "a", "B": "b$(A)"})
    cases = {"$(A)": "a", "x$(A)y$(B)": "xayb$(A)", "$$(A)": "$(A)", "$$$(A)": "$a", "$(UNSET)": "$(UNSET)",
             "$(A": "$(A", "$A": "$A", "$": "$", "$$": "$", "a$": "a$", "$()": "$()", "$(A)$": "a$", "$$$$": "$$",
             "$(A)(B)": "a(B)", "$ (A)": "$ (A)", "$é": "$Ã\udca9"}
    for text, expected in cases.items():
        assert expand(text, m) == expected, text
    env = container_environment({"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "$(A)-$(C)"},
                                         {"name": "C", "value": "3"}, {"name": "S", "valueFrom": {}}]},
                                lambda var: f"secret-{var['name']}")
    assert env == {"A": "1", "B": "1-$(C)", "C": "3", "S": "secret-S"}


# What a user may write, and $(...) references to every variable the children's containers have.
VARIABLES = ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HOME", "HF_HOME",
             "MASTER_ADDR", "NNODES", "NODE_RANK", "JUDGE_KEY", "KUBERNETES_SERVICE_HOST", "SELFLENGTHEN_WORKDIR"]
USER_TEXT = st.lists(st.one_of(st.sampled_from([f"$({v})" for v in VARIABLES] + ["$$", "$", "$(", ")", "$$(HF_TOKEN)",
                                                                                 "$é", "(", "x"]),
                               st.text(alphabet="abcXYZ019-_./:$()é", max_size=6)),
                     min_size=1, max_size=6).map("".join)


def _rendered_containers(run) -> list[dict]:
    from selflengthen.operator import resources as r

    objects = [r.serving_deployment(run, 0, 1), r.serving_deployment(run, 1, 1),
               r.stage_job(run, 1, "respond", 1, endpoint_url=r.endpoint(run, 0)),
               r.stage_job(run, 1, "evaluate", 1, endpoint_url=r.endpoint(run, 1)),
               r.training_job(run, 1, "train-generator", 1)]
    out = []
    for obj in objects:
        pod = obj["spec"]["template"]["spec"]
        out += [*pod.get("initContainers", []), *pod["containers"]]
    return out


def _value_from(var: dict) -> str:
    source = var["valueFrom"]
    return f"<secret {var['name']}>" if "secretKeyRef" in source else f"<field {var['name']}>"


@PROPERTY
@given(model=USER_TEXT, extra=st.lists(USER_TEXT, max_size=3), prefix=USER_TEXT, region=USER_TEXT)
def test_user_strings_reach_containers_literally_after_kubelet_expansion(model, extra, prefix, region):
    from kube_fixtures import make_run, spec
    from selflengthen.operator.spec import parse_spec

    prefix = "/".join(p for p in prefix.split("/") if p not in ("", ".", ".."))
    data = spec(inference={"model": model, "extraArgs": [f"--x-{i}={a}" for i, a in enumerate(extra)],
                           "hfTokenSecret": {"name": "hf", "key": "token"}},
                training={"nodes": 2, "processesPerNode": 2},
                storage={"uri": f"s3://bucket/{prefix}".rstrip("/"), "credentialsSecret": "s3", "region": region,
                         "endpointUrl": "http://minio.minio:9000"},
                secretEnv=[{"name": "JUDGE_KEY", "secretKeyRef": {"name": "judge", "key": "k"}}])
    try:
        parse_spec("demo", data)
    except ConfigError:
        return  # refused at validation: nothing is rendered
    run = make_run(data)
    uri = run.config.storage.uri
    seen = set()
    for container in _rendered_containers(run):
        seen.add(container["name"])
        env = container_environment(container, _value_from)
        argv = expanded_argv(container, env)
        assert not any("<secret" in a for a in argv), (container["name"], argv)
        assert env.get("AWS_REGION", region) == region
        if container["name"] == "vllm":
            assert model in argv and all(f"--x-{i}={a}" in argv for i, a in enumerate(extra)), argv
        elif container["name"] == "fetch-models":
            assert argv[argv.index("--storage") + 1] == uri, argv
        elif container["name"] == "train":  # our own $(VAR)s (torchrun's rendezvous) still expand
            assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--node-rank") + 1] == (
                "<field NODE_RANK>"), argv
    assert seen == {"vllm", "fetch-models", "stage", "train"}


# -- one reader of vLLM flags --------------------------------------------------------------------------------------

PORT_SPELLINGS = [["--port", "9000"], ["--port=9000"], ["--po" + "rt=9000"], ["--port", "9000", "--enforce-eager"]]
TP_SPELLINGS = [["--tensor-parallel-size", "2"], ["--tensor_parallel_size=2"], ["-tp", "2"], ["-tp=2"],
                ["--tensor-parallel", "2"], ["--enforce-eager", "--tensor-parallel-size=2"]]


@pytest.mark.parametrize("args", [*PORT_SPELLINGS, ["--max_model_len=64"], ["--max-model-len", "64"],
                                  ["--served_model_name", "a", "b"], ["--enable-lora"], ["--no-enable-lora"],
                                  ["--lora_modules", "a=/x"], ["--host=0.0.0.0"], ["--model", "m"]])
def test_every_spelling_of_a_flag_the_local_runner_sets_is_refused(args):
    with pytest.raises(ConfigError, match=r"  local\.extraArgs: .*is set by selflengthen"):
        parse_config({"local": {"extraArgs": args}})


@pytest.mark.parametrize("args", [*TP_SPELLINGS, *PORT_SPELLINGS, ["--device-memory-utilization", "0.5"]])
def test_every_spelling_of_a_flag_the_operator_sets_is_refused(args):
    from kube_fixtures import spec
    from selflengthen.operator.spec import parse_spec

    with pytest.raises(ConfigError, match=r"spec\.inference\.extraArgs: must not repeat flags the operator sets"):
        parse_spec("demo", spec(inference={"extraArgs": args}))


@pytest.mark.parametrize("args", [["--enable-prefix-caching"], ["--max-num-seqs", "8"], ["-O3"], ["--seed", "-1"],
                                  ["--compilation-config.level", "3"], ["--dtype=bfloat16"], ["-q", "fp8"],
                                  ["--enforce-eager", "--max-num-batched-tokens=4096"]])
def test_ordinary_vllm_arguments_pass(args):
    assert parse_config({"local": {"extraArgs": args}}).local.extra_args == args


SPELLED = [["--port", "1"], ["--port=2"], ["--max_model_len", "64"], ["-tp", "2"], ["-tp=4"],
           ["--tensor-parallel", "2"], ["--enable-lora"], ["--no-enable-lora"], ["--served", "a", "b"],
           ["--max-num-seqs", "3"], ["--seed=-1"], ["--enforce-eager"], ["-O3"], ["-q", "fp8"],
           ["--served-model-name=x"], ["--lora-modules", "a=/p", "b=/q"], ["--max-lora-rank=16"],
           ["--gpu_memory_utilization", "0.5"], ["--host", "h"], ["--dtype", "half"],
           ["--device-memory-utilization", "0.7"], ["--max-model", "32"], ["--api_key", "k"]]
# vLLM's own parser, in a subprocess (importing vLLM into the test process would change its logging and threads):
# the dests each command line sets (those that differ from their defaults), and whether the table is current.
VLLM_SIDE = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
from selflengthen.pipeline import vllm_flags_gen as vllm_flags
parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
out = {"tableCurrent": vllm_flags.TABLE_PATH.read_text() == vllm_flags._table_from_vllm(), "set": []}
for args in json.loads(sys.stdin.read()):
    ns = parser.parse_args(["some-model", *args])
    out["set"].append(sorted(a.dest for a in parser._actions if a.option_strings and a.dest != "help"
                             and getattr(ns, a.dest, a.default) != a.default))
print(json.dumps(out))
"""


@pytest.mark.vllm
def test_the_flag_table_is_vllms_own_and_the_reader_reads_flags_as_vllm_does():
    """Which flags a command line sets, by our reader and by vLLM's own parser (seeded random command lines made
    of many spellings): every flag vLLM sets, ours names too. And the checked-in table is the installed vLLM's."""
    import random
    import subprocess
    import sys

    pytest.importorskip("vllm")
    from selflengthen.pipeline.vllm_flags import parse

    rng = random.Random(13)
    lines = [[a for part in rng.sample(SPELLED, rng.randint(1, 5)) for a in part] for _ in range(150)]
    proc = subprocess.run([sys.executable, "-c", VLLM_SIDE], input=json.dumps(lines), capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tableCurrent"], "run `python -m selflengthen.pipeline.vllm_flags_gen --write`"
    for args, theirs in zip(lines, result["set"], strict=True):
        ours = {a.dest for a in parse(args) if a.dest}
        assert set(theirs) <= ours, (args, set(theirs) - ours)


def test_long_lists_and_mappings_are_refused_at_load():
    from selflengthen.pipeline.yamlfile import MAX_ENTRIES

    for text in ("stop: [" + "a, " * MAX_ENTRIES + "b]\n", "bogus:\n" + "".join(f"  k{i}: 1\n" for i in range(
            MAX_ENTRIES + 1))):
        with pytest.raises(YAMLFileError, match=rf"^in\.yaml:\d+:\d+: a list or mapping of more than {MAX_ENTRIES}"):
            parse_documents(text, "in.yaml")
    assert len(parse_documents("[" + "1, " * (MAX_ENTRIES - 1) + "1]")[0]) == MAX_ENTRIES


def test_yaml_1_1_lookalikes_are_read_as_the_strings_they_are(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: dates\nmodels:\n  base: 2024-01-01\n  generator: 1:30\n  extender: 'no'\n"
                    "sampling:\n  stop: [yes, off, 0o17x]\n")
    config = load_config(path)
    assert (config.models.base, config.models.generator, config.models.extender) == ("2024-01-01", "1:30", "no")
    assert config.sampling.stop == ["yes", "off", "0o17x"]
