PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MUJOCO_GL ?= egl
export JAX_PLATFORMS ?= cpu

.PHONY: env test demo efficacy bench clean

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
	$(PY) correct.py --ckpt $(DEMO_RUN) --out $(DEMO_RUN)/eval --alpha-sweep 0.03,0.1,0.3 --num-samples 1,2,4,8

# The closed-loop experiment of EFFICACY.md: state-only demos -> policy + energy -> tune alpha on seeds 200
# -> report on seeds 100. EFF_ALPHA is the tune step's choice for the committed config (EFFICACY.md, session 3);
# re-read runs/.../tune/results.md and set it when the config changes.
EFF_DATA ?= data/generated/metaworld_state
EFF_RUN ?= runs/metaworld_state
EFF_TASKS ?= reach-v3,push-v3,pick-place-v3,drawer-open-v3
EFF_ALPHA ?= 0.1
EFF_EPISODES ?= 50

efficacy: $(STAMP)
	test -f $(EFF_DATA)/meta/info.json || $(PY) -m eqx_energy.sim.generate --out $(EFF_DATA) --no-images \
	  --tasks $(EFF_TASKS) --episodes-per-task 100 --noisy-fraction 0 --max-steps 150
	$(PY) train.py --config metaworld_energy --run-dir $(EFF_RUN) --set data.root=$(EFF_DATA)
	$(PY) correct.py eval-sim --ckpt $(EFF_RUN) --tasks $(EFF_TASKS) --seed 200 --episodes 25 --batch-envs 25 \
	  --sigmas 0.5,1.0 --steps 3 --alpha 0.03,0.1,0.3 --out $(EFF_RUN)/tune
	$(PY) correct.py eval-sim --ckpt $(EFF_RUN) --tasks $(EFF_TASKS) --seed 100 --episodes $(EFF_EPISODES) \
	  --batch-envs $(EFF_EPISODES) --sigmas 0,0.3,0.5,1.0 --steps 3 --alpha $(EFF_ALPHA) --out $(EFF_RUN)/eval

bench: $(STAMP)
	for script in benchmarks/[!_]*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) runs data/generated .pytest_cache
