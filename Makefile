# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo

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
	bash scripts/build_wheels.sh $(PY)

clean:
	rm -rf $(DEMO_DIR) build dist *.egg-info
