# Two commands on a fresh machine (README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup lpips demo web-demo test lint bench gpu-check-prepare clean-venv

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the pinned requirements

lpips: setup  ## fetch, convert and verify the real LPIPS backbones (offline-capable, idempotent)
	$(PY) -m utils.lpips_weights

demo: setup  ## enhance samples/ with the bundled checkpoint into results/samples (+ grid.png)
	$(PY) test_unpaired.py --input samples --output results/samples --grid results/samples/grid.png --overwrite

web-demo: setup  ## the Gradio page on http://127.0.0.1:7860 (optional packages in requirements-demo.txt)
	$(PY) -m pip install --quiet -r requirements-demo.txt
	$(PY) demo.py

test: setup lpips  ## run the test suite
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup  ## speed figures on this machine
	$(PY) bench/speed.py --quick

gpu-check-prepare: lpips  ## wheels (.whl/) and LPIPS weights (.lpips/) that bench/gpu_check.py's device call carries
	PY=$(PY) bash bench/gpu_check_prepare.sh

clean-venv:
	rm -rf $(VENV)
