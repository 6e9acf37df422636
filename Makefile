# The two commands of the README. Each makes .venv and installs requirements.txt once (again when it changes).
PYTHON ?= python3
PY := .venv/bin/python

.PHONY: study test

.venv/installed: requirements.txt
	$(PYTHON) -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

# the suite on both cores, one test file per worker (a file's fixtures are built once); it ends with its 15 slowest
# steps, where the suite's time goes
test: .venv/installed
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# The main job: the toy study (docs/STUDY.md's main grid, sized for 2 CPU cores) -> out/study/report.md.
# Resumable: run it again after an interruption and finished steps are skipped.
study: .venv/installed
	$(PY) study.py
