# `make test` and `make quickstart` do all the set-up on a fresh clone: system packages, a virtualenv
# with the pinned torch wheels, the project with its extras, then the job itself.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
EXTRAS ?= train,eval,test,demo,serving

.PHONY: install lint test test-fast quickstart demo gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	command -v ffmpeg >/dev/null && [ -f /usr/share/wordnet/data.noun ] && [ -x /usr/bin/chromedriver ] || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends ffmpeg wordnet-base wordnet-sense-index chromium chromium-driver)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# ruff (configured in pyproject.toml) over the whole tree; `make test` runs it first, so a lint failure fails CI.
lint: install
	@$(BIN)/ruff check . || { echo "make lint: ruff found the problems above (ruff check --fix sorts imports)" >&2; exit 1; }

test: lint
	$(BIN)/python -m pytest

quickstart: install
	$(BIN)/multimood quickstart --output_dir outputs/quickstart

demo: quickstart
	$(BIN)/multimood demo --model outputs/quickstart

gpu-check: install
	PYTHON=$(BIN)/python bash bench/gpu_check.sh

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
