# The two entry points of README: `make main` and `make test`.
# Both create .venv on first use (Python 3.11): the pinned requirements,
# then km_tf itself (editable, with its console programs km-train,
# km-evaluate, km-tune, km-export).

PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: main test test-fast setup

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $(STAMP)

# The offline main job: pretrain a small base on digits 0-4, adapt a KM task
# to digits 5-9, and write the task file and report under runs/main.
main: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/python apps/train.py --output_dir=runs/main

# The whole test suite (what CI runs), on two worker processes (CI has two
# cores, and most tests keep one busy). `--dist loadfile` keeps each file's
# tests, and so its module fixtures, in one worker.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile -m "not slow"
