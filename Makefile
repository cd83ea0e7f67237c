# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo
DATA   ?= $(if $(CIFARKIT_DATA),$(CIFARKIT_DATA),torchvision)

.PHONY: venv demo test lint clean embedding

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job: train the blog recipe, export verified artifacts, classify a few test images with them.
demo: $(STAMP)
	$(BIN)/cifar-train --data "$(DATA)" --out $(RUN)
	$(BIN)/cifar-export $(RUN)/checkpoint.pt --out $(RUN) --format all
	$(BIN)/python scripts/demo_images.py --data "$(DATA)" --out $(RUN)/samples --count 20
	$(BIN)/cifar-infer $(RUN)/samples --model $(RUN)/model.onnx

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# npm packages for examples/node and examples/web, and Debian's Chromium: what tests/test_embedding.py needs.
embedding:
	bash scripts/setup-embedding.sh

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
