# The two commands of the README. Each makes .venv and installs requirements.txt once (again when it changes).
PYTHON ?= python3
PY := .venv/bin/python

.PHONY: study test

.venv/installed: requirements.txt
	$(PYTHON) -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

test: .venv/installed
	$(PY) -m pytest -q tests

study: .venv/installed
	$(PY) prepare.py
	$(PY) train.py config/toy.py --data=medsafety/none --out_dir=out/toy
