PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MUJOCO_GL ?= egl
export JAX_PLATFORMS ?= cpu

.PHONY: env test demo bench clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,sim]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=25 tests

DEMO_DATA ?= data/generated/metaworld
DEMO_RUN ?= runs/demo

demo: $(STAMP)
	test -f $(DEMO_DATA)/meta/info.json || $(PY) -m eqx_energy.sim.generate --out $(DEMO_DATA)
	$(PY) train.py --config demo --run-dir $(DEMO_RUN) --set data.root=$(DEMO_DATA)
	$(PY) correct.py --ckpt $(DEMO_RUN) --out $(DEMO_RUN)/eval

bench: $(STAMP)
	for script in benchmarks/[!_]*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) runs data/generated .pytest_cache
