"""Strict YAML -> nested frozen dataclasses, and the training config groups owned by `train`.

Any frozen dataclass tree is a config: field types may be int, float, bool, str, None,
`X | None`, `tuple[X, ...]`, `tuple[X, Y]`, `dict[str, X]`, `Literal[...]` and nested
dataclasses. Loading is strict: an unknown key, a wrong type or a missing required field raises
`ConfigError` with one line naming the key, where it came from (file or `--set`), what was
expected and what arrived. YAML floats follow YAML 1.2 (`5e-4` is a float, as a reader expects;
PyYAML alone would read it as a string). String values may use `${VAR}` or `${VAR:-default}`;
an unset variable without a default is an error naming the key and the variable.

    cfg = load_config(TrainConfig, "libero_energy", overrides=["optim.energy_lr=1e-4"])
    write_config(cfg, run_dir / "config.yaml")        # load_config(TrainConfig, that path) == cfg
"""

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from eqx_energy._files import atomic_write
from eqx_energy.correct import CorrectionConfig
from eqx_energy.energy import EnergyConfig
from eqx_energy.policy.pi0 import Pi0Config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
"""Where a bare config name (`libero_energy` or `libero_energy.yaml`) is looked up."""


class ConfigError(ValueError):
    """A config problem, described in one line that a CLI can print before exiting non-zero."""


# ------------------------------------------------------------------------------------------------
# Generic groups of the training config (the lead composes them into TrainConfig).


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW per parameter group, each with its own warmup + cosine schedule.

    lr(n) = peak * n / warmup for n < warmup, then
    peak * (r + (1 - r) * (1 + cos(pi * t)) / 2), t = (n - warmup) / (decay - warmup) clipped to 1,
    r = min_lr_ratio; n counts applied updates of that group.
    """

    energy_lr: float = 5e-4  # peak lr of the energy head (seed 000)
    policy_lr: float = 2.5e-5  # peak lr of the policy (openpi's Pi0 fine-tuning value)
    warmup_steps: int = 1000
    decay_steps: int | None = None  # schedule length incl. warmup; None = the run's train.steps
    schedule: Literal["cosine", "constant"] = "cosine"  # constant: warmup, then the peak
    min_lr_ratio: float = 0.1  # final lr = peak * min_lr_ratio
    weight_decay: float = 1e-4  # decoupled (AdamW), on arrays with ndim >= 2 only
    clip_norm: float = 1.0  # per-group global-norm gradient clipping
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    ema_decay: float | None = None  # EMA of the trainable leaves; None = off

    def __post_init__(self) -> None:
        for name in ("energy_lr", "policy_lr", "clip_norm", "eps"):
            _require(getattr(self, name) > 0, f"optim.{name} must be > 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _require(
            self.decay_steps is None or self.decay_steps > self.warmup_steps,
            "optim.decay_steps must be > optim.warmup_steps (it includes the warmup)",
        )
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
        _require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _require(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, "optim.b1 and optim.b2 must be in [0, 1)")
        _require(
            self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
            "optim.ema_decay must be in (0, 1) or null (off)",
        )


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    """What the loop does and when: mode, length, logging/checkpoint cadence, seed, mesh."""

    mode: Literal["energy_only", "joint", "monitor"] = "energy_only"
    steps: int = 30_000
    log_interval: int = 100
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 3  # keep the last N checkpoints
    seed: int = 0
    mesh: tuple[int, int] = (-1, 1)  # (data, fsdp) sizes; -1 = all remaining devices
    energy_warm_steps: int = 0  # steps before the energy optimizer starts (seed 003)
    energy_grad_to_backbone: bool = False  # joint mode: energy loss gradient reaches the policy
    wandb: bool = False  # also log to wandb (offline unless WANDB_MODE says otherwise)

    def __post_init__(self) -> None:
        for name in ("steps", "log_interval", "checkpoint_interval", "keep_checkpoints"):
            _require(getattr(self, name) > 0, f"train.{name} must be > 0")
        _require(self.energy_warm_steps >= 0, "train.energy_warm_steps must be >= 0")
        _require(
            all(n == -1 or n > 0 for n in self.mesh) and self.mesh.count(-1) <= 1,
            f"train.mesh must be two sizes > 0 with at most one -1, got {list(self.mesh)}",
        )


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which energy loss and its hyperparameters (formulas in eqx_energy.losses)."""

    kind: Literal["infonce_inbatch", "infonce_explicit", "hinge", "mixed", "policy_softmax", "policy_ranking"] = (
        "infonce_inbatch"
    )
    tau: float = 0.5  # InfoNCE temperature: logits = -E / tau (the initial value when learn_tau)
    learn_tau: bool = False  # tau = exp(log_tau), a trained leaf of the energy head
    chunk: int | None = None  # rows of the (b, b) energy matrix per checkpointed chunk; None = all
    # infonce_inbatch: k negatives per context drawn from the batch each step (b (k + 1) pairs, not b²);
    # None = all b - 1 other examples
    num_negatives: int | None = None
    margin: float = 1.0  # hinge: relu(margin + E_pos - E_neg)
    weights: tuple[float, float] = (1.0, 1.0)  # mixed: (infonce, hinge) weights
    negative_sigmas: tuple[float, ...] = (0.1, 0.3, 0.5)  # explicit negatives: a + sigma * N(0, 1)
    energy_weight: float = 1.0  # joint mode: total = flow loss + energy_weight * energy loss
    # policy_softmax / policy_ranking: candidates {expert chunk, K policy samples} per frame, drawn
    # on the fly in the step (stop_gradient) from the frozen policy, or the current one in joint mode
    num_policy_samples: int = 8  # K
    policy_sample_steps: int = 10  # flow Euler steps per sample (fewer = cheaper training samples)
    beta: float = 1.0  # policy_softmax soft targets: softmax_k(-beta ||a_k - a*||²), summed over h and a
    rank_weighted: bool = False  # policy_ranking: weight each pair by its distance gap
    # policy_softmax: noise every candidate of a frame to one t ~ U(lo, hi) (x_t = t eps + (1 - t) a) and
    # score with the time-conditioned energy (guided sampling's query); null = clean candidates
    noise_t: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _require(self.tau > 0, "loss.tau must be > 0")
        _require(self.num_policy_samples > 0, "loss.num_policy_samples must be > 0")
        _require(self.policy_sample_steps > 0, "loss.policy_sample_steps must be > 0")
        _require(self.beta >= 0, "loss.beta must be >= 0")
        _require(
            not self.learn_tau or self.kind != "hinge",
            "loss.learn_tau needs a temperature-scaled loss; loss.kind=hinge has none (set learn_tau: false)",
        )
        _require(
            self.noise_t is None or (self.kind == "policy_softmax" and 0.0 <= self.noise_t[0] < self.noise_t[1] <= 1.0),
            "loss.noise_t must be null or [lo, hi] with 0 <= lo < hi <= 1, and only with loss.kind=policy_softmax",
        )
        _require(self.chunk is None or self.chunk > 0, "loss.chunk must be > 0 or null")
        _require(
            self.num_negatives is None or (self.num_negatives > 0 and self.kind == "infonce_inbatch" and self.chunk is None),
            "loss.num_negatives must be null or > 0, and only with loss.kind=infonce_inbatch and loss.chunk=null "
            "(sampled negatives score b (k + 1) pairs, nothing to chunk)",
        )
        _require(self.margin >= 0, "loss.margin must be >= 0")
        _require(all(s > 0 for s in self.negative_sigmas), "loss.negative_sigmas must all be > 0")
        _require(self.energy_weight >= 0, "loss.energy_weight must be >= 0")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """The run's default energy-guided inference (eqx_energy.policy.energy_sampling), what `correct.py serve`
    and `eval-sim` use unless their flags say otherwise. "gradient" takes its knobs from `correction`
    (off when correction.steps is 0); select and guided draw `num_samples` candidates per observation."""

    method: Literal["off", "gradient", "select", "guided"] = "gradient"
    num_samples: int = 8
    margin: float = 0.0  # select / guided: keep the plain sample unless the best beats it by more than this
    guide_scale: float = 0.1  # guided: lambda(t) = guide_scale * w(t)
    schedule: Literal["constant", "linear", "cosine"] = "linear"  # guided: w(t)
    query: Literal["a_hat", "x_t"] = "a_hat"  # guided: E at the clean estimate, or at x_t (time-conditioned E)

    def __post_init__(self) -> None:
        _require(self.num_samples >= 1, "inference.num_samples must be >= 1")
        _require(self.margin >= 0, "inference.margin must be >= 0")
        _require(self.guide_scale >= 0, "inference.guide_scale must be >= 0")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """The policy: its architecture, where its weights and tokenizer come from."""

    model: Pi0Config = Pi0Config()
    checkpoint: str | None = None  # openpi params dir (.../params); None = fresh init (demo)
    tokenizer: str | None = None  # sentencepiece model; None = trained on the dataset's tasks, kept in the run
    frozen_dtype: str | None = "bfloat16"  # energy_only: the frozen backbone's dtype; None = as loaded
    sample_steps: int = 10  # flow-matching Euler steps when sampling actions

    def __post_init__(self) -> None:
        _require(self.sample_steps > 0, "policy.sample_steps must be > 0")
        _require(self.frozen_dtype in (None, "bfloat16", "float32"), "policy.frozen_dtype must be bfloat16, float32 or null")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A LeRobot dataset and openpi's input transforms over it (eqx_energy.data)."""

    root: str  # dataset directory (meta/info.json inside); ${VAR} expands
    action_dim: int = 7  # environment action dims (LIBERO 7, Meta-World 4) = energy.action_dim
    delta_dims: int | None = None  # first N action dims made relative to the state (pi0_libero: 6)
    image_key: str | None = "image"  # null = state-only (no cameras; policy.model.image_keys: [])
    wrist_key: str | None = "wrist_image"
    state_key: str = "state"
    discrete_state: bool = False  # Pi0.5-style discretized state in the prompt
    quantile_norm: bool | None = None  # None = openpi's (quantiles for Pi0.5, z-score for Pi0)
    norm_stats: str | None = None  # norm_stats.json (or an openpi checkpoint's assets); None = computed
    holdout_fraction: float = 0.1  # episodes held out from training, recorded in the run
    holdout_seed: int = 0
    batch_size: int = 32
    workers: int = 0  # grain worker processes (0 is fastest on 2 cores)

    def __post_init__(self) -> None:
        _require(self.action_dim > 0, "data.action_dim must be > 0")
        _require(self.batch_size > 1, "data.batch_size must be > 1 (in-batch negatives need b >= 2)")
        _require(0.0 <= self.holdout_fraction < 1.0, "data.holdout_fraction must be in [0, 1)")
        _require(
            self.image_key is not None or self.wrist_key is None,
            "data.wrist_key needs data.image_key (a state-only run sets both to null)",
        )
        _require(
            self.delta_dims is None or 0 < self.delta_dims <= self.action_dim,
            "data.delta_dims must be in 1..data.action_dim or null",
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole run: `python train.py --config NAME [--set key.sub=value ...]`."""

    policy: PolicyConfig
    energy: EnergyConfig
    data: DataConfig
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    # A factory: CorrectionConfig() holds jnp arrays, and building them at import time would
    # start the XLA backend before a multi-host program can call jax.distributed.initialize.
    correction: CorrectionConfig = dataclasses.field(default_factory=CorrectionConfig)
    inference: InferenceSettings = InferenceSettings()
    run_dir: str | None = None  # default for --run-dir

    def __post_init__(self) -> None:
        _require(
            self.data.batch_size % (self.loss.chunk or self.data.batch_size) == 0,
            "loss.chunk must divide data.batch_size",
        )
        _require(
            self.loss.noise_t is None or self.energy.time_conditioning,
            "loss.noise_t scores noised candidates at their flow time t: set energy.time_conditioning: true",
        )


# ------------------------------------------------------------------------------------------------
# YAML with YAML 1.2 floats (PyYAML reads `5e-4` as a string).


class _Loader(yaml.SafeLoader):
    pass


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, *, origin: str) -> Any:
    """YAML text -> Python values (YAML 1.2 floats); a syntax error becomes a one-line ConfigError."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: invalid YAML: {' '.join(str(e).split())}") from None


# ------------------------------------------------------------------------------------------------
# Building a dataclass tree from plain values.


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    return str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _expand_env(text: str, key: str, origin: str) -> str:
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{origin}: key '{key}' uses ${{{name}}} but environment variable {name} is not set; "
            f"set it or override the key with --set {key}=..."
        )

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, text)


def _convert(tp: Any, value: Any, key: str, origin: str) -> Any:
    """Check `value` against the annotation `tp`, returning the typed value (tuples, dataclasses)."""

    def bad() -> ConfigError:
        return ConfigError(f"{origin}: key '{key}' expects {_type_name(tp)}, got {_show(value)}")

    origin_tp, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, str):
        value = _expand_env(value, key, origin)
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise bad()
        return None
    if origin_tp in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1 and (dataclasses.is_dataclass(arms[0]) or typing.get_origin(arms[0])):
            return _convert(arms[0], value, key, origin)  # a group/tuple/dict: its own, precise error
        for arm in arms:
            try:
                return _convert(arm, value, key, origin)
            except ConfigError:
                continue
        raise bad()
    if origin_tp is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise bad()
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise bad()
        return _build(tp, value, key, origin)
    if origin_tp is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]", origin) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"{origin}: key '{key}' expects {len(args)} items ({_type_name(tp)}), "
                f"got {len(value)}: {value!r}"
            )
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_convert(a, v, f"{key}[{i}]", origin) for i, (a, v) in pairs)
    if origin_tp is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise bad()
        return {k: _convert(args[1], v, f"{key}.{k}", origin) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise ConfigError(
        f"{origin}: key '{key}' has an unsupported field type {_type_name(tp)} in its dataclass"
    )


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _unknown_key(name: str, prefix: str, valid: Sequence[str], origin: str) -> ConfigError:
    key = f"{prefix}{name}"
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"{origin}: unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}")


def _build(cls: type, data: Mapping, key: str, origin: str) -> Any:
    prefix = f"{key}." if key else ""
    fields = _fields(cls)
    for name in data:
        if name not in fields:
            raise _unknown_key(name, prefix, list(fields), origin)
    kwargs = {}
    for name, (field, tp) in fields.items():
        if name in data:
            kwargs[name] = _convert(tp, data[name], prefix + name, origin)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{origin}: missing required key '{prefix}{name}' ({_type_name(tp)})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        where = f"'{key}'" if key else "config"
        raise ConfigError(f"{origin}: invalid {where}: {' '.join(str(e).split())}") from None


def from_dict(cls: type, data: Mapping, *, origin: str = "<dict>") -> Any:
    """Plain nested dict -> instance of the dataclass `cls`, checked strictly (see module doc)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: expected a mapping of keys at the top level, got {_show(data)}")
    return _build(cls, data, "", origin)


def to_dict(config: Any) -> Any:
    """Dataclass tree -> plain dicts/lists/scalars (tuples become lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    if hasattr(config, "shape") and hasattr(config, "dtype"):  # array leaves (e.g. correction.alpha)
        return _plain(np.asarray(config))
    return config


def _plain(array: np.ndarray) -> Any:
    """Array -> (nested lists of) Python scalars; floats by their shortest repr in their own
    precision (f32 0.3 -> 0.3, not 0.30000001192092896), which converts back to the same bits."""
    if array.ndim:
        return [_plain(a) for a in array]
    value = array[()]
    return float(str(value)) if array.dtype.kind == "f" else value.item()


# ------------------------------------------------------------------------------------------------
# Overrides, files, the effective config.


def _apply_override(cls: type, data: dict, override: str) -> None:
    """Check `a.b.c=value` against the dataclass tree of `cls`, then set it in the raw dict `data`."""
    origin = f"--set {override}"
    path, sep, text = override.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"{origin}: expected key.sub=value, e.g. --set optim.energy_lr=1e-4")
    names = path.strip().split(".")
    tp, node = cls, data
    for depth, name in enumerate(names):
        prefix = ".".join(names[:depth])
        arms = (
            [tp]
            if dataclasses.is_dataclass(tp)
            else [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        )
        if not arms:
            raise ConfigError(f"{origin}: key '{prefix}' is a {_type_name(tp)}, not a group with sub-keys")
        fields = _fields(arms[0])
        if name not in fields:
            raise _unknown_key(name, f"{prefix}." if prefix else "", list(fields), origin)
        tp = fields[name][1]
        if depth < len(names) - 1:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
    value = parse_yaml(text, origin=origin)
    node[names[-1]] = to_dict(_convert(tp, value, ".".join(names), origin))


def resolve_config_path(name: str | os.PathLike, config_dir: Path = CONFIG_DIR) -> Path:
    """An existing path as given, else a bare name looked up in `config_dir` (`.yaml` optional)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.parent == Path("."):
        for candidate in (config_dir / path.name, config_dir / f"{path.name}.yaml"):
            if candidate.is_file():
                return candidate
    known = sorted(p.stem for p in config_dir.glob("*.yaml")) if config_dir.is_dir() else []
    close = difflib.get_close_matches(path.stem, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"config '{name}' not found as a path or in {config_dir}{hint}; "
        f"available: {', '.join(known) or 'none'}"
    )


def load_config(
    cls: type, name: str | os.PathLike, overrides: Sequence[str] = (), *, config_dir: Path = CONFIG_DIR
) -> Any:
    """YAML file (path or bare name in `config_dir`) + `key.sub=value` overrides -> `cls` instance."""
    path = resolve_config_path(name, config_dir)
    data = parse_yaml(path.read_text(), origin=str(path))
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {_show(data)}")
    for override in overrides:  # each checked on its own, so its errors name the override
        _apply_override(cls, data, override)
    origin = f"{path} with --set {' '.join(overrides)}" if overrides else str(path)
    return from_dict(cls, data, origin=origin)


def dump_config(config: Any) -> str:
    """The effective config as YAML text; `from_dict(type(config), parse_yaml(text))` == config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)


def write_config(config: Any, path: str | os.PathLike) -> None:
    """Write `dump_config(config)` to `path` atomically."""
    atomic_write(path, dump_config(config))
