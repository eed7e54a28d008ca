# Two commands for a fresh machine: `make demo` and `make test` (`make integration` adds the long
# end-to-end runs; CI runs both). All create (or reuse) the virtualenv in .venv and install the
# project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test integration lint install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning-ood fit --config configs/demo.yaml --overwrite true
	$(BIN)/lightning-ood test --config configs/demo.yaml --ckpt_path checkpoints/demo/last.ckpt

test: $(STAMP)
	$(BIN)/pytest

integration: $(STAMP)
	$(BIN)/pytest -m integration

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
