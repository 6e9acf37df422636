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

# Until the full grid exists (probe.py and the study are open issues), the main job is the world's own evidence:
# pretrain config/toy.py on the raw corpus and on the filtered (safe-only) corpus, then attack both with the oracle.
study: .venv/installed
	$(PY) prepare.py
	$(PY) reflect.py --intervention=none
	$(PY) reflect.py --intervention=filter
	$(PY) train.py config/toy.py --data=medsafety/none --out_dir=out/toy-raw
	$(PY) train.py config/toy.py --data=medsafety/filter --out_dir=out/toy-filter
	$(PY) attack.py --ckpt=out/toy-raw --decoding=greedy
	$(PY) attack.py --ckpt=out/toy-filter --decoding=greedy
