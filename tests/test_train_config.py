"""Strict YAML config loading: round trip, unknown keys, wrong types, --set overrides, env vars."""

import dataclasses
from typing import Literal

import numpy as np
import pytest

from eqx_energy.train.config import (
    ConfigError,
    LossConfig,
    OptimConfig,
    TrainLoopConfig,
    dump_config,
    from_dict,
    load_config,
    parse_yaml,
    resolve_config_path,
    to_dict,
    write_config,
)


@dataclasses.dataclass(frozen=True)
class Head:
    width: int = 8
    act: Literal["relu", "gelu"] = "relu"


@dataclasses.dataclass(frozen=True)
class Toy:
    run_dir: str
    optim: OptimConfig = OptimConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    loss: LossConfig = LossConfig()
    head: Head | None = None
    tags: dict[str, int] = dataclasses.field(default_factory=dict)


YAML = """
run_dir: runs/toy
optim:
  energy_lr: 5e-4
  warmup_steps: 10
  ema_decay: 0.999
train:
  mode: joint
  steps: 200
  mesh: [2, -1]
loss:
  kind: mixed
  weights: [0.5, 2]
  negative_sigmas: [0.2]
head: {width: 16}
tags: {a: 1}
"""


@pytest.fixture
def cfg_dir(tmp_path):
    (tmp_path / "toy.yaml").write_text(YAML)
    return tmp_path


def test_load_types_and_defaults(cfg_dir):
    cfg = load_config(Toy, "toy", config_dir=cfg_dir)
    assert cfg.optim.energy_lr == 5e-4 and isinstance(cfg.optim.energy_lr, float)
    assert cfg.optim.policy_lr == OptimConfig().policy_lr
    assert cfg.train == TrainLoopConfig(mode="joint", steps=200, mesh=(2, -1))
    assert cfg.loss.weights == (0.5, 2.0) and isinstance(cfg.loss.weights[1], float)
    assert cfg.loss.negative_sigmas == (0.2,)
    assert cfg.head == Head(width=16, act="relu")
    assert cfg.tags == {"a": 1}


def test_round_trip_through_yaml(cfg_dir, tmp_path):
    cfg = load_config(Toy, cfg_dir / "toy.yaml", ["optim.eps=1e-12", "head=null"])
    out = tmp_path / "effective.yaml"
    write_config(cfg, out)
    again = load_config(Toy, out)
    assert again == cfg
    assert from_dict(Toy, parse_yaml(dump_config(cfg), origin="x")) == cfg
    assert to_dict(again)["train"]["mesh"] == [2, -1]


def test_bare_name_and_suggestion(cfg_dir):
    assert resolve_config_path("toy", cfg_dir) == cfg_dir / "toy.yaml"
    assert resolve_config_path("toy.yaml", cfg_dir) == cfg_dir / "toy.yaml"
    with pytest.raises(ConfigError, match=r"config 'tyo' not found.*did you mean 'toy'"):
        resolve_config_path("tyo", cfg_dir)


def one_line_error(cfg_dir, text, overrides=()):
    (cfg_dir / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(Toy, "bad", overrides, config_dir=cfg_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_key_file_and_suggestion(cfg_dir):
    msg = one_line_error(cfg_dir, "run_dir: r\noptim:\n  enrgy_lr: 1.0e-3\n")
    assert "unknown key 'optim.enrgy_lr'" in msg
    assert "did you mean 'optim.energy_lr'" in msg
    assert str(cfg_dir / "bad.yaml") in msg


def test_wrong_type_names_key_expected_and_got(cfg_dir):
    msg = one_line_error(cfg_dir, "run_dir: r\ntrain:\n  steps: 1.5\n")
    assert "key 'train.steps' expects int, got float 1.5" in msg
    msg = one_line_error(cfg_dir, "run_dir: r\ntrain:\n  mode: jiont\n")
    assert "key 'train.mode' expects one of 'energy_only', 'joint', 'monitor', got str 'jiont'" in msg
    msg = one_line_error(cfg_dir, "run_dir: r\ntrain:\n  wandb: 1\n")
    assert "key 'train.wandb' expects bool, got int 1" in msg
    msg = one_line_error(cfg_dir, "run_dir: r\ntrain:\n  mesh: [1, 2, 3]\n")
    assert "key 'train.mesh' expects 2 items" in msg
    msg = one_line_error(cfg_dir, "optim: {}\n")
    assert "missing required key 'run_dir'" in msg


def test_invalid_value_from_post_init(cfg_dir):
    msg = one_line_error(cfg_dir, "run_dir: r\noptim:\n  warmup_steps: 10\n  decay_steps: 5\n")
    assert "invalid 'optim'" in msg and "decay_steps must be > optim.warmup_steps" in msg


def test_invalid_yaml_is_one_line(cfg_dir):
    msg = one_line_error(cfg_dir, "run_dir: [unclosed\n")
    assert "invalid YAML" in msg


def test_overrides_are_typed_and_validated(cfg_dir):
    cfg = load_config(
        Toy,
        "toy",
        ["optim.energy_lr=1e-3", "train.mesh=[4, 2]", "head.act=gelu", "train.wandb=true", "loss.chunk=4"],
        config_dir=cfg_dir,
    )
    assert cfg.optim.energy_lr == 1e-3
    assert cfg.train.mesh == (4, 2) and cfg.train.wandb is True
    assert cfg.head == Head(width=16, act="gelu")
    assert cfg.loss.chunk == 4
    # A group that is null in the file gets its defaults plus the override.
    (cfg_dir / "nohead.yaml").write_text("run_dir: r\n")
    assert load_config(Toy, "nohead", ["head.width=3"], config_dir=cfg_dir).head == Head(width=3)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "optim.energy_lrr=1",
            "--set optim.energy_lrr=1: unknown key 'optim.energy_lrr' (did you mean 'optim.energy_lr'?)",
        ),
        ("train.steps=ten", "--set train.steps=ten: key 'train.steps' expects int, got str 'ten'"),
        ("run_dir.x=1", "--set run_dir.x=1: key 'run_dir' is a str, not a group"),
        ("optim.energy_lr", "--set optim.energy_lr: expected key.sub=value"),
        ("train.steps=0", "invalid 'train': train.steps must be > 0"),
    ],
)
def test_bad_overrides(cfg_dir, override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(Toy, "toy", [override], config_dir=cfg_dir)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_override_fixes_a_bad_file_value(cfg_dir):
    (cfg_dir / "b.yaml").write_text("run_dir: r\ntrain:\n  steps: -3\n")
    assert load_config(Toy, "b", ["train.steps=3"], config_dir=cfg_dir).train.steps == 3


def test_environment_variables(cfg_dir, monkeypatch):
    (cfg_dir / "env.yaml").write_text(
        "run_dir: ${EQX_TEST_ROOT}/runs\nhead: {act: '${EQX_TEST_ACT:-gelu}'}\n"
    )
    monkeypatch.setenv("EQX_TEST_ROOT", "/data")
    cfg = load_config(Toy, "env", config_dir=cfg_dir)
    assert cfg.run_dir == "/data/runs" and cfg.head.act == "gelu"
    monkeypatch.delenv("EQX_TEST_ROOT")
    with pytest.raises(ConfigError, match=r"key 'run_dir' uses \$\{EQX_TEST_ROOT\} but environment variable"):
        load_config(Toy, "env", config_dir=cfg_dir)
    assert load_config(Toy, "env", ["run_dir=/x"], config_dir=cfg_dir).run_dir == "/x"


def test_yaml_floats_follow_yaml_1_2():
    assert parse_yaml("[5e-4, 1E3, -2.5e+1, .5, 1.0, 7, .inf, 0x10, '1e3']", origin="x") == [
        5e-4,
        1e3,
        -25.0,
        0.5,
        1.0,
        7,
        float("inf"),
        16,
        "1e3",
    ]


def test_real_groups_and_array_fields_round_trip():
    from eqx_energy import CorrectionConfig, EnergyConfig

    @dataclasses.dataclass(frozen=True)
    class Run:
        energy: EnergyConfig
        correction: CorrectionConfig = CorrectionConfig()

    cfg = from_dict(Run, {"energy": {"context_dim": 16, "action_dim": 4}, "correction": {"alpha": 0.3}})
    text = dump_config(cfg)
    assert "alpha: 0.3," in text or "alpha: 0.3\n" in text
    again = from_dict(Run, parse_yaml(text, origin="x"))
    assert again.energy == cfg.energy
    assert to_dict(again) == to_dict(cfg)
    assert np.asarray(again.correction.alpha).tobytes() == np.asarray(cfg.correction.alpha).tobytes()
    with pytest.raises(ConfigError, match="key 'energy.output' expects one of 'sigmoid'"):
        from_dict(Run, {"energy": {"context_dim": 16, "action_dim": 4, "output": "sigmod"}})


def test_policy_sample_loss_options_are_checked():
    """noise_t: an ordered range in [0, 1], policy_softmax only, and a time-conditioned energy;
    learn_tau needs a temperature (not hinge)."""
    from eqx_energy.train.config import TrainConfig

    base = load_config(TrainConfig, "metaworld_energy_select")
    assert base.loss.kind == "policy_softmax" and base.loss.num_policy_samples == 8
    with pytest.raises(ValueError, match="loss.noise_t must be"):
        LossConfig(kind="policy_softmax", noise_t=(0.8, 0.2))
    with pytest.raises(ValueError, match="loss.noise_t must be"):
        LossConfig(kind="policy_ranking", noise_t=(0.0, 1.0))
    with pytest.raises(ValueError, match="learn_tau"):
        LossConfig(kind="hinge", learn_tau=True)
    with pytest.raises(ConfigError, match="energy.time_conditioning"):
        load_config(TrainConfig, "metaworld_energy_select", overrides=["loss.noise_t=[0.0, 1.0]"])
    noised = load_config(
        TrainConfig, "metaworld_energy_select",
        overrides=["loss.noise_t=[0.0, 1.0]", "energy.time_conditioning=true"],
    )
    assert noised.loss.noise_t == (0.0, 1.0)
