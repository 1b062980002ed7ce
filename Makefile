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
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

DEMO_DATA ?= data/generated/metaworld
DEMO_RUN ?= runs/demo

demo: $(STAMP)
	test -f $(DEMO_DATA)/meta/info.json || $(PY) -m eqx_energy.sim.generate --out $(DEMO_DATA)
	$(PY) train.py --config demo --run-dir $(DEMO_RUN) --set data.root=$(DEMO_DATA)
	$(PY) correct.py --ckpt $(DEMO_RUN) --out $(DEMO_RUN)/eval --alpha-sweep 0.03,0.1,0.3 --num-samples 1,2,4,8

# The closed-loop experiment of EFFICACY.md (issue 12's recipe): state-only demos -> a policy trained jointly
# (metaworld_energy) -> its export -> an energy trained energy_only against that frozen policy's own samples
# (metaworld_energy_select) -> offline diagnostics -> tune N on seeds 200 -> report on seeds 100, every method
# paired with the plain policy on the same episodes and beside the oracle at the same N. EFF_METHOD / EFF_N /
# EFF_SCALE are the tune step's choice (EFFICACY.md, session 6: guided, 8, 1); re-read $(EFF_RUN)/tune*/paired.md
# and set them when the recipe changes.
EFF_DATA ?= data/generated/metaworld_state
EFF_POLICY_RUN ?= runs/metaworld_state
EFF_RUN ?= runs/metaworld_select
EFF_TASKS ?= reach-v3,push-v3,pick-place-v3,drawer-open-v3
EFF_METHOD ?= guided
EFF_N ?= 8
EFF_SCALE ?= 1
EFF_EPISODES ?= 100

efficacy: $(STAMP)
	test -f $(EFF_DATA)/meta/info.json || $(PY) -m eqx_energy.sim.generate --out $(EFF_DATA) --no-images \
	  --tasks $(EFF_TASKS) --episodes-per-task 100 --noisy-fraction 0 --max-steps 150
	$(PY) train.py --config metaworld_energy --run-dir $(EFF_POLICY_RUN) --set data.root=$(EFF_DATA)
	test -d $(EFF_POLICY_RUN)/policy_params || $(PY) -m eqx_energy.checkpoints.export_policy $(EFF_POLICY_RUN)
	$(PY) train.py --config metaworld_energy_select --run-dir $(EFF_RUN) --set data.root=$(EFF_DATA) \
	  --set policy.checkpoint=$(EFF_POLICY_RUN)/policy_params --set policy.tokenizer=$(EFF_POLICY_RUN)/tokenizer.model \
	  --set data.norm_stats=$(EFF_POLICY_RUN)/norm_stats.json
	$(PY) correct.py --ckpt $(EFF_RUN) --num-samples 1,4,8,16 --out $(EFF_RUN)/offline
	$(PY) correct.py eval-sim --ckpt $(EFF_RUN) --tasks $(EFF_TASKS) --seed 200 --episodes 25 --batch-envs 25 \
	  --sigmas 0,0.3 --method off,select,oracle --num-samples 4,8 --out $(EFF_RUN)/tune
	$(PY) correct.py eval-sim --ckpt $(EFF_RUN) --tasks $(EFF_TASKS) --seed 200 --episodes 25 --batch-envs 25 \
	  --sigmas 0,0.3 --method off,guided --num-samples 1,8 --guide-scale 0.3,1 --out $(EFF_RUN)/tune_guided
	$(PY) correct.py eval-sim --ckpt $(EFF_RUN) --tasks $(EFF_TASKS) --seed 100 --episodes $(EFF_EPISODES) \
	  --batch-envs 50 --sigmas 0,0.3 --method off,$(EFF_METHOD),oracle --num-samples $(EFF_N) \
	  --guide-scale $(EFF_SCALE) --out $(EFF_RUN)/eval

bench: $(STAMP)
	for script in benchmarks/[!_]*.py; do \
	  case $$script in *full_size.py) continue;; esac; $(PY) $$script || exit 1; done  # full_size: ~1 h, 16 GB

clean:
	rm -rf $(VENV) runs data/generated .pytest_cache
