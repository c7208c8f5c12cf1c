# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
# Python of Kaggle's image, the wheel set's target (make wheels KAGGLE_PYTHON=3.11 for an older image)
KAGGLE_PYTHON ?= 3.12

.PHONY: demo test report wheels clean

$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	bash scripts/demo.sh $(PY) $(DEMO_DIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q

report: $(VENV)/.installed
	bash scripts/report.sh $(PY)

wheels: $(VENV)/.installed
	$(PY) scripts/build_wheels.py --python-version $(KAGGLE_PYTHON)

clean:
	rm -rf $(DEMO_DIR) build dist *.egg-info
