# Every user-facing target bootstraps .venv on first use: a fresh clone needs no install step.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TS_CONFIG := serve_config/config.properties

DATA ?= sample
CONFIG ?= configs/$(DATA).yaml
MODEL ?= artifacts/food/latest
IMAGE ?= examples/pizza.jpg
FORMAT ?=
ARGS ?=

export PATH := $(abspath $(VENV))/bin:$(PATH)
export TS_CONFIG_FILE := $(abspath $(TS_CONFIG))

.PHONY: install sample-data train evaluate predict export archive serve stop serve-onnx \
        demo test lint bench bench-full soak lifecycle-demo mlflow-ui clean

install: $(STAMP)

# torch/torchvision come from pip (never uv/poetry) so a local wheel cache and the version
# caps in pyproject.toml apply.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,serve,openvino,torchserve,bench,dev]"
	@command -v java >/dev/null || { echo "TorchServe needs Java 17: apt-get install -y openjdk-17-jre-headless" >&2; }
	touch $(STAMP)

sample-data: $(STAMP)
	test -d data/sample || $(PY) -m training sample-data data/sample

train: $(STAMP)
	@if [ "$(DATA)" = "sample" ]; then $(MAKE) --no-print-directory sample-data; fi
	$(PY) -m training train --config $(CONFIG) $(ARGS)

evaluate: $(STAMP)
	$(PY) -m training evaluate --model $(MODEL) $(ARGS)

predict: $(STAMP)
	$(PY) -m training predict $(IMAGE) --model $(MODEL) $(ARGS)

# --variants all: also validate int8 and OpenVINO variants; servers run the fastest that passed.
export: $(STAMP)
	$(PY) -m training export --model $(MODEL) --variants all $(ARGS)

archive: $(STAMP)
	$(PY) -m training export --model $(MODEL) --variants all
	$(PY) -m training archive --model $(MODEL) $(if $(FORMAT),--format $(FORMAT)) $(ARGS)

serve: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE torchserve --start --ts-config $(TS_CONFIG) --models food=food.mar --ncs
	@for i in $$(seq 120); do $(PY) serve_config/healthcheck.py 2>/dev/null && exit 0; sleep 1; done; \
	  echo "TorchServe did not answer /ping within 120s: see logs/" >&2; exit 1

stop: $(STAMP)
	torchserve --stop

# Exports model.onnx first when MODEL is a version directory that has none yet.
serve-onnx: $(STAMP)
	if [ -d "$(MODEL)" ] && [ ! -f "$(MODEL)/model.onnx" ]; then $(PY) -m training export --model $(MODEL); fi
	$(PY) -m serving --model $(MODEL) $(ARGS)

demo: $(STAMP)
	$(PY) -m training demo

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check training serving handlers benchmarks tests
	hadolint Dockerfile

# The harness's extra (aiohttp load generator, captum for TorchServe's stock handler) is
# installed on first use. Reports go to benchmarks/results/<timestamp>.{json,md,-serving.png}.
bench: $(STAMP)
	$(PY) -m benchmarks --quick $(ARGS)

bench-full: $(STAMP)
	$(PY) -m benchmarks --full $(ARGS)

# Our server and TorchServe at 80 % of their measured maximum, 10 minutes each (not in make
# test): errors by kind, p50/p99 over time, resident memory; exit 1 when a target is missed.
# Shorter: make soak ARGS="--minutes 2".
soak: $(STAMP)
	$(PY) -m benchmarks.soak $(ARGS)

# Serve v1 following the champion alias, send and confirm fresh images, retrain on them,
# promote only if better on the same evaluation set, switch the running server under load.
lifecycle-demo: $(STAMP)
	$(PY) -m training lifecycle-demo $(ARGS)

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000

clean:
	rm -rf artifacts checkpoints model_store/*.mar logs mlruns mlflow.db .pytest_cache \
	       .hypothesis serve_config/.snapshots benchmarks/scratch lifecycle
