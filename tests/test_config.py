"""Run configuration: defaults, validation with camelCase YAML paths, loading, dumping."""

import re
from pathlib import Path

import pytest
import yaml

from selflengthen.pipeline.config import (
    Client,
    ConfigError,
    RunConfig,
    Sampling,
    dump_config,
    load_config,
    parse_config,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def config_error(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


# -- defaults (the reference implementation's) -----------------------------------------------------------------------


def test_sampling_defaults_match_the_reference():
    s = RunConfig().sampling
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.7, 0.8, 20, 1.1)
    assert s.max_tokens == 16384
    assert s.stop == []  # the reference's "---" / triple-newline stops cut markdown short


def test_pipeline_defaults_match_the_reference():
    c = RunConfig()
    assert c.self_instruct.instructions_per_iteration == 5000
    assert c.self_instruct.few_shot == 2
    assert c.self_instruct.max_tries == 10
    assert (c.self_instruct.min_words, c.self_instruct.max_words) == (3, 500)
    assert c.self_instruct.judge is True
    assert c.respond.samples_per_instruction == 2
    assert c.respond.max_retries == 20
    assert c.extend.attempts == 2
    assert c.extend.passes == 3
    assert c.extend.min_growth == 1.2
    assert c.extend.max_retries == 20
    assert c.extend.keep_fraction == pytest.approx(2 / 3)
    assert c.build_sft.line_drop_probability == 0.2
    assert c.training.learning_rate == 1e-4
    assert c.training.epochs == 4
    assert c.training.scheduler == "cosine"
    assert c.training.warmup_ratio == 0.1
    assert c.training.cutoff_tokens == 16384
    assert c.languages == ["en"]


def test_empty_mapping_gives_the_defaults():
    assert parse_config({}) == RunConfig()


def test_defaults_are_not_shared_between_instances():
    a, b = RunConfig(), RunConfig()
    a.sampling.stop.append("END")
    a.languages.append("zh")
    assert b.sampling.stop == [] and b.languages == ["en"]


# -- camelCase on disk -----------------------------------------------------------------------------------------------


def test_camel_case_keys_set_the_fields():
    c = parse_config(
        {
            "sampling": {"topP": 0.5, "topK": -1, "repetitionPenalty": 1.3, "maxTokens": 99, "stop": ["END"]},
            "selfInstruct": {"instructionsPerIteration": 7, "fewShot": 3},
            "respond": {"samplesPerInstruction": 4},
            "extend": {"minGrowth": 1.5, "keepFraction": 0.5},
            "storage": {"uri": "s3://my-bucket/runs/", "endpointUrl": "http://127.0.0.1:9000", "shardSize": 5},
            "client": {"deadlineSeconds": 12, "maxAttempts": 3},
            "buildSft": {"lineDropProbability": 0.1},
        }
    )
    assert (c.sampling.top_p, c.sampling.top_k, c.sampling.repetition_penalty) == (0.5, -1, 1.3)
    assert c.sampling.max_tokens == 99 and c.sampling.stop == ["END"]
    assert c.self_instruct.instructions_per_iteration == 7 and c.self_instruct.few_shot == 3
    assert c.respond.samples_per_instruction == 4
    assert c.extend.min_growth == 1.5 and c.extend.keep_fraction == 0.5
    assert c.storage.uri == "s3://my-bucket/runs"  # trailing slash dropped
    assert c.storage.endpoint_url == "http://127.0.0.1:9000" and c.storage.shard_size == 5
    assert c.client.deadline_seconds == 12 and c.client.max_attempts == 3
    assert c.build_sft.line_drop_probability == 0.1


def test_endpoint_trailing_slash_is_dropped():
    assert parse_config({"models": {"endpoint": "http://vllm:8000/v1/"}}).models.endpoint == "http://vllm:8000/v1"


# -- bad values name the field by its YAML path ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, path, wanted",
    [
        ({"sampling": {"topP": 1.5}}, "sampling.topP", "less than or equal to 1"),
        ({"sampling": {"topP": 0}}, "sampling.topP", "greater than 0"),
        ({"sampling": {"temperature": -0.1}}, "sampling.temperature", "greater than or equal to 0"),
        ({"sampling": {"topK": -2}}, "sampling.topK", "greater than or equal to -1"),
        ({"sampling": {"repetitionPenalty": 0}}, "sampling.repetitionPenalty", "greater than 0"),
        ({"sampling": {"maxTokens": 0}}, "sampling.maxTokens", "greater than or equal to 1"),
        ({"sampling": {"stop": ["ok", ""]}}, "sampling.stop.1", "at least 1 character"),
        ({"selfInstruct": {"instructionsPerIteration": 0}}, "selfInstruct.instructionsPerIteration", ">= 1"),
        ({"selfInstruct": {"fewShot": 9}}, "selfInstruct.fewShot", "less than or equal to 8"),
        ({"respond": {"samplesPerInstruction": 0}}, "respond.samplesPerInstruction", ">= 1"),
        ({"extend": {"minGrowth": 1.0}}, "extend.minGrowth", "greater than 1"),
        ({"extend": {"passes": 0}}, "extend.passes", ">= 1"),
        ({"client": {"concurrency": "many"}}, "client.concurrency", "valid integer"),
        ({"client": {"deadlineSeconds": 0}}, "client.deadlineSeconds", "greater than 0"),
        ({"storage": {"uri": "http://bucket/x"}}, "storage.uri", "must start with file:// or s3://"),
        ({"storage": {"uri": "file://"}}, "storage.uri", "must start with file:// or s3://"),
        ({"storage": {"uri": "s3://Bad_Bucket/x"}}, "storage.uri", "valid bucket name"),
        ({"storage": {"uri": "s3://bucket/a/../b"}}, "storage.uri", "'..'"),
        ({"storage": {"shardSize": 0}}, "storage.shardSize", ">= 1"),
        ({"models": {"endpoint": "ftp://host/v1"}}, "models.endpoint", "http:// or https://"),
        ({"models": {"apiKeyEnv": "1-KEY"}}, "models.apiKeyEnv", "must be the name of an environment variable"),
        ({"name": "Not_A_DNS_Label"}, "name", "must be a DNS label: lowercase letters, digits and '-'"),
        ({"name": "x" * 64}, "name", "at most 63"),
        ({"languages": ["en", "en"]}, "languages", "must not repeat a language"),
        ({"languages": []}, "languages", "at least 1 item"),
        ({"languages": ["fr"]}, "languages.0", "'en' or 'zh'"),
        ({"buildSft": {"lineDropProbability": 1}}, "buildSft.lineDropProbability", "less than 1"),
        ({"training": {"lora": {"rank": 0}}}, "training.lora.rank", ">= 1"),
        ({"training": {"mode": "qlora"}}, "training.mode", "'lora' or 'full'"),
        ({"evaluate": {"items": 241}}, "evaluate.items", "less than or equal to 240"),
        ({"sampling": 5}, "sampling", "valid dictionary"),
    ],
)
def test_bad_value_names_the_camel_case_path(data, path, wanted):
    message = config_error(data)
    assert message.startswith("invalid run configuration:")
    lines = [line.strip() for line in message.splitlines()[1:]]
    assert len(lines) == 1, message
    field, _, reason = lines[0].partition(": ")
    assert field == path, message
    # pydantic says "greater than or equal to 1"; accept the short spelling in the table
    reason = reason.replace("greater than or equal to ", ">= ")
    assert wanted.replace("greater than or equal to ", ">= ") in reason, message


def test_cross_field_rule_names_its_section_and_fields():
    message = config_error({"selfInstruct": {"minWords": 10, "maxWords": 11}})
    assert "selfInstruct: minWords must be at least 2 below maxWords" in message
    parse_config({"selfInstruct": {"minWords": 10, "maxWords": 12}})  # 10 < n < 12 leaves 11: fine


def test_every_bad_field_is_reported_at_once():
    message = config_error({"sampling": {"topK": -2}, "selfInstruct": {"instructionsPerIteration": 0}, "x": 1})
    fields = sorted(line.strip().split(":")[0] for line in message.splitlines()[1:])
    assert fields == ["sampling.topK", "selfInstruct.instructionsPerIteration", "x"]


@pytest.mark.parametrize(
    "data, path",
    [
        ({"bogus": 1}, "bogus"),
        ({"sampling": {"top_pp": 0.5}}, "sampling.top_pp"),
        ({"storage": {"url": "file://./x"}}, "storage.url"),
        ({"training": {"lora": {"ranks": 4}}}, "training.lora.ranks"),
        ({"selfInstruct": {"instructionsPerIter": 10}}, "selfInstruct.instructionsPerIter"),
    ],
)
def test_unknown_fields_are_refused(data, path):
    assert f"{path}: unknown field" in config_error(data)


@pytest.mark.parametrize(
    "data, hint",
    [
        ({"sampling": {"top_pp": 0.5}}, "sampling.top_pp: unknown field (did you mean topP?)"),
        ({"respond": {"samples_per_instrution": 2}}, "(did you mean samplesPerInstruction?)"),
        ({"evaluate": {"judge": {"modle": "j"}}}, "evaluate.judge.modle: unknown field (did you mean model?)"),
        ({"zzz": 1}, "zzz: unknown field (known here: name, iterations, languages, seed, models"),
    ],
)
def test_unknown_fields_name_the_closest_known_one(data, hint):
    assert hint in config_error(data)


def test_patterns_are_explained_in_words_and_a_key_is_never_echoed():
    message = config_error({"name": "My_Run"})
    assert "beginning and ending with a letter or digit" in message and "'My_Run'" in message
    assert "[a-z0-9]" not in message
    message = config_error({"models": {"apiKeyEnv": "sk-live-0123"}})
    assert "models.apiKeyEnv: must be the name of an environment variable" in message
    assert "sk-live-0123" not in message


@pytest.mark.parametrize("data", [[1, 2], "text", 3, None])
def test_non_mapping_top_level_is_refused(data):
    assert "expected a mapping at the top level" in config_error(data)


# -- files -----------------------------------------------------------------------------------------------------------


def test_example_local_tiny_loads():
    """The README's promises about the shipped example: tiny local model, loosened filters, the whole loop."""
    c = load_config(EXAMPLES / "local-tiny.yaml")
    assert c.name == "local-tiny" and c.models.base == "tiny://qwen2" and c.models.endpoint is None
    assert c.iterations >= 2 and c.training.mode == "lora" and c.evaluate.enabled
    assert c.self_instruct.judge is False
    assert c.filters.check_ending is False and c.filters.check_meta is False
    assert c.storage.uri.startswith("file://")


def test_load_reports_the_yaml_path_and_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: ok\nsampling:\n  topP: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"sampling\.topP: Input should be less than or equal to 1"):
        load_config(path)


@pytest.mark.parametrize("text", ["# nothing here\n", "", "{}\n"])
def test_an_empty_file_is_refused_naming_the_defaults_it_would_run(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"is empty: it would run the paper-scale defaults \(3 iterations of 5,000 "
                                          r"instructions each, models.base tiny://qwen2\) under the name local-tiny"):
        load_config(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_file_is_refused(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}:1:1: a run configuration is a mapping at the top"):
        load_config(path)


@pytest.mark.parametrize("text, where", [("name: [unclosed\n", "2:1"), ("a: b: c\n", "1:5"),
                                         ("key: 'open\n", "2:1"), ("\tname: tab\n", "1:1")])
def test_invalid_yaml_is_refused_in_one_line_naming_file_line_and_column(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}:{where}: not valid YAML") as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_non_utf8_file_is_refused_naming_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}:1:10: not UTF-8 text \\(byte 0xe9\\)$"):
        load_config(path)


def test_missing_file_is_refused(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# -- dump -> parse ---------------------------------------------------------------------------------------------------


def test_dump_is_camel_case_yaml():
    data = yaml.safe_load(dump_config(RunConfig()))
    assert data["sampling"]["topP"] == 0.8
    assert data["sampling"]["repetitionPenalty"] == 1.1
    assert data["selfInstruct"]["instructionsPerIteration"] == 5000
    assert data["buildSft"]["lineDropProbability"] == 0.2
    assert data["storage"]["shardSize"] == 64
    snake = [k for section in data.values() if isinstance(section, dict) for k in section if "_" in k]
    assert snake == []


@pytest.mark.parametrize(
    "config",
    [
        RunConfig(),
        parse_config(
            {
                "name": "round-trip",
                "languages": ["zh", "en"],
                "seed": 42,
                "models": {"endpoint": "https://llm.example/v1", "apiKeyEnv": "LLM_KEY"},
                "sampling": {"topK": -1, "stop": ["---", "\n\n\n"], "temperature": 0},
                "storage": {"uri": "s3://bucket-1/a/b", "endpointUrl": "http://127.0.0.1:9000"},
                "training": {"mode": "full", "lora": {"targetModules": ["q_proj", "v_proj"]}},
                "evaluate": {"languages": ["zh"], "maxTokens": 128},
            }
        ),
        load_config(EXAMPLES / "local-tiny.yaml"),
    ],
    ids=["defaults", "custom", "local-tiny"],
)
def test_dump_parse_round_trips(config, tmp_path):
    text = dump_config(config)
    assert parse_config(yaml.safe_load(text)) == config
    path = tmp_path / "dumped.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path) == config
    assert dump_config(load_config(path)) == text


def test_client_section_can_be_built_directly():
    # The inference tests build small clients this way; bounds apply there too.
    assert Client(backoff_seconds=0.01, deadline_seconds=0.2).deadline_seconds == 0.2
    with pytest.raises(ValueError):
        Client(concurrency=0)
    assert Sampling(top_k=5).top_k == 5
