# Two commands on a fresh machine with Python 3.10+: `make repro` and `make test`.
# Both create .venv and install the project with the pins of constraints.txt (once, and again when
# pyproject.toml or constraints.txt change); `make lock` re-pins after a dependency change.
VENV := .venv
BIN := $(abspath $(VENV))/bin
INSTALLED := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup repro verify models bundle test lint lock

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[pipeline,dev]"
	touch $@

repro: $(INSTALLED)  ## data, trainings, evaluation, report
	dvc repro

MODEL_STAGES := train_vanilla train_coordbias train_coordconv families/dvc.yaml:train

models: $(INSTALLED)  ## the committed models from the repository's own DVC remote (bundled/), no training
	dvc pull -r bundled $(MODEL_STAGES)

bundle: $(INSTALLED)  ## after dvc repro: bundled/ holds exactly the current models (then commit it)
	rm -rf bundled
	dvc push -r bundled $(MODEL_STAGES)

verify: $(INSTALLED)  ## after make repro: does the reproduction agree with the committed results?
	python -m posconv.tools.verify

test: $(INSTALLED) lint  ## tests, then the metrics gate on the committed results
	pytest -q
	python -m posconv.tools.check

lint: $(INSTALLED)
	ruff check .
	ruff format --check .

lock: $(INSTALLED)  ## pin what is installed (torch without its local +cpu label)
	pip freeze --exclude-editable | sed 's/^torch==\([^+]*\)+.*/torch==\1/' > constraints.txt
