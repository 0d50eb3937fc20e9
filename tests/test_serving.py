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
