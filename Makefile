# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo
# The demo's data source; empty: scripts/demo_data.py picks $CIFARKIT_DATA, torchvision or the bundled sample.
DATA   ?=

.PHONY: venv demo demo-steps test test-all fuzz faults lint clean embedding

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job: train the blog recipe, export verified artifacts, classify a few test images with them and
# evaluate the exported model on the test set. The data: $(DATA) if given, else scripts/demo_data.py's choice
# ($CIFARKIT_DATA, else torchvision's CIFAR-10, else offline the bundled sample, saying so on stderr).
demo: $(STAMP)
	@data="$(if $(DATA),$(DATA),$$($(BIN)/python scripts/demo_data.py))" && \
	  $(MAKE) --no-print-directory demo-steps DATA="$$data"

demo-steps: $(STAMP)
	$(BIN)/cifar-train --data "$(DATA)" --out $(RUN) --overwrite
	$(BIN)/cifar-export $(RUN)/checkpoint.pt --out $(RUN) --format all
	$(BIN)/python scripts/demo_images.py --data "$(DATA)" --out $(RUN)/samples --count 20
	$(BIN)/cifar-infer $(RUN)/samples --model $(RUN)/model.onnx
	$(BIN)/cifar-eval $(RUN)/model.onnx --data "$(DATA)" --out $(RUN)/eval

test: $(STAMP)
	$(BIN)/python -m pytest

# Everything, the tests marked slow included (SIGTERM for export and training, airbench under torchrun):
# before a release.
test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

# The long fuzzing profile (600 cases per target) and the full fault-injection matrix; both print their figures.
fuzz: $(STAMP)
	CIFARKIT_FUZZ=long $(BIN)/python -m pytest -q -s tests/test_fuzz.py

faults: $(STAMP)
	CIFARKIT_FAULTS=long $(BIN)/python -m pytest -m "" -q -s tests/test_faults.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# npm packages for examples/node and examples/web, and Debian's Chromium: what tests/test_embedding.py needs.
embedding:
	bash scripts/setup-embedding.sh

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
