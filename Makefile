# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_DATA := data/demo

.PHONY: install demo demo-data test test-fast lint format lock clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(DEMO_DATA)/dataset.json: | $(STAMP)
	$(BIN)/fiqa make-demo-data -o $(DEMO_DATA) --image-size 72  # the demo's models see 72 px

demo-data: $(DEMO_DATA)/dataset.json

## The whole recipe on the embedded synthetic dataset, on a local Ray.
demo: install demo-data
	$(BIN)/fiqa run configs/demo.yaml

## The test suite (unit tests, each stage on tiny data, end to end, kill-and-resume).
test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^fiqa' > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf runs $(DEMO_DATA)
