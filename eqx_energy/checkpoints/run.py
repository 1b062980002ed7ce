"""Orbax checkpoints of a training run: `<run_dir>/checkpoints/<step>/<item>`.

Items per step: `params` (trainable arrays), `opt_state`, `ema` (when the run keeps one), `data`
(the grain iterator's position, one JSON per process), `config` and `norm_stats` (JSON), `meta`
(JSON: step, skipped-update count). Saving is atomic (orbax writes a temporary directory and
renames it once complete), asynchronous (arrays are copied off the device, then written in the
background; `wait()` or `close()` blocks until done) and keeps the last `keep` steps. Restoring
places arrays directly onto the shardings of a template of `jax.ShapeDtypeStruct`s, so nothing
is initialized first, and only the items asked for are read (inference reads `ema` or `params`
alone, never `opt_state`). Errors name the checkpoint path and never delete or overwrite anything.

    with RunCheckpoints(run_dir, keep=3) as ckpt:
        if (step := ckpt.latest_step) is not None:
            r = ckpt.restore(step, params=abstract(params), opt_state=abstract(opt_state), data_iter=it)
        ...
        ckpt.save(step, params=params, opt_state=opt_state, skipped=skipped, data_iter=it, config=cfg_dict)
"""

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PyTree

# A replicated array is written whole by its first replica. Orbax's default on CPU splits the write
# over the replicas, which compiles one slice per leaf and replica: at the first save of the tiny
# model on 8 devices, 23.5 CPU-s against 1.9 s this way (restores are unaffected).
_absl = logging.getLogger("absl")  # orbax warns on every override; this one is deliberate
_level = _absl.level
_absl.setLevel(logging.ERROR)
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
)
_absl.setLevel(_level)


class CheckpointError(RuntimeError):
    """A missing, incomplete or unreadable checkpoint; the message names the path."""


class Restored(NamedTuple):
    """A checkpoint's items; an array item is None when no template was given for it."""

    step: int
    params: PyTree | None
    opt_state: PyTree | None
    ema: PyTree | None
    skipped: int  # non-finite updates skipped before this step
    config: dict | None  # the run's config as saved (plain dict); None in a checkpoint without one
    norm_stats: dict | None  # as saved: numpy arrays come back as lists


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


def _is_step_dir(path: Path) -> bool:
    return path.is_dir() and path.name.isdigit()


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """Largest completed checkpoint step of a run, or None (no run dir or no checkpoint yet).

    Incomplete saves (orbax's temporary directories, e.g. after `kill -9`) are not counted.
    """
    directory = checkpoint_dir(run_dir)
    steps = [int(p.name) for p in directory.iterdir() if _is_step_dir(p)] if directory.is_dir() else []
    return max(steps, default=None)


def abstract(tree: PyTree) -> PyTree:
    """Arrays -> `jax.ShapeDtypeStruct`s with the same shape, dtype and sharding (restore templates)."""
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x
        ),
        tree,
    )


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value).tolist()
    return value


def _leaf_paths(tree: PyTree) -> set[tuple[str, ...]]:
    """Array leaves by path (attribute, key or index names), as orbax stores them."""
    name = lambda k: str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(map(name, p)) for p, x in leaves if isinstance(x, (jax.ShapeDtypeStruct, ocp.metadata.ArrayMetadata))}


def _tree_restore(item_dir: Path, template: PyTree) -> ocp.args.PyTreeRestore:
    """Restore args for one array item, matched to the checkpoint leaf by leaf.

    Orbax records a module's None fields too, so a checkpoint saved before an optional submodule
    existed (`energy.pooling`, off) would not restore into today's tree. The arrays are compared by
    path instead: they must be the same set (else CheckpointError), and None fields may differ.
    """
    on_disk = _leaf_paths(ocp.PyTreeCheckpointHandler().metadata(item_dir.absolute()).tree)
    wanted = _leaf_paths(template)
    if on_disk != wanted:
        show = lambda paths: ", ".join(".".join(p) for p in sorted(paths)[:5]) + (" ..." if len(paths) > 5 else "")
        raise CheckpointError(
            f"checkpoint item {item_dir} holds different arrays than this model: "
            f"missing {show(wanted - on_disk) or 'none'}; unexpected {show(on_disk - wanted) or 'none'}. "
            "It was saved with another model setup (check the run's config); it was left untouched"
        )
    template = _with_sharding(template)
    return ocp.args.PyTreeRestore(
        template, restore_args=ocp.checkpoint_utils.construct_restore_args(template), partial_restore=True
    )


def _restore_data_position(data_dir: Path, data_iter: Iterator) -> None:
    """Move `data_iter` to the position saved in `data_dir` (grain's files, one per process), also
    when the run resumes on a different number of processes.

    Every process iterates over the same global batch indices (it decodes only its rows of each,
    `data.pipeline`), so the processes' saved states are equal, and any process count can resume
    from them. grain's own handler reads only `process_<i>-of-<n>.json` for today's n.
    """
    index, count = jax.process_index(), jax.process_count()
    mine = data_dir / f"process_{index}-of-{count}.json"
    if not mine.exists():
        saved = sorted(data_dir.glob("process_*-of-*.json"))
        states = {f.read_text() for f in saved}
        if len(states) != 1:
            raise CheckpointError(
                f"{data_dir} has no data position for process {index} of {count}, and its "
                f"{len(saved)} saved positions ({', '.join(f.name for f in saved) or 'none'}) are not one "
                "position to share; it was left untouched"
            )
        mine = saved[0]
    state = mine.read_text()
    data_iter.set_state(json.loads(state) if isinstance(data_iter, grain.DatasetIterator) else state.encode())
    if hasattr(data_iter, "start_prefetch"):
        data_iter.start_prefetch()


def _with_sharding(template: PyTree) -> PyTree:
    """Give template leaves without a sharding the default device's, so orbax need not guess."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
            if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None
            else x
        ),
        template,
    )


class RunCheckpoints:
    """Save and restore a run's checkpoints under `<run_dir>/checkpoints`; keeps the last `keep`."""

    def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"RunCheckpoints: keep must be >= 1, got {keep}; set train.keep_checkpoints")
        self.directory = checkpoint_dir(run_dir)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    @property
    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        *,
        params: PyTree,
        opt_state: PyTree,
        skipped: int | jax.Array,
        config: Mapping[str, Any],
        ema: PyTree | None = None,
        data_iter: Iterator | None = None,
        norm_stats: Mapping[str, Any] | None = None,
    ) -> None:
        """Start saving step `step` (returns once arrays are off the device; `wait()` to finish).

        The data iterator's position is read now, so the iterator may move on right away.
        """
        if step in self._manager.all_steps():
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} already exists; not overwriting it"
            )
        self._manager.wait_until_finished()  # surface a failed previous save before starting another
        items = {
            "params": ocp.args.PyTreeSave(params),
            "opt_state": ocp.args.PyTreeSave(opt_state),
            "config": ocp.args.JsonSave(_jsonable(config)),
            "meta": ocp.args.JsonSave({"step": int(step), "skipped": int(skipped)}),
        }
        if ema is not None:
            items["ema"] = ocp.args.PyTreeSave(ema)
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if norm_stats is not None:
            items["norm_stats"] = ocp.args.JsonSave(_jsonable(norm_stats))
        self._manager.save(step, args=ocp.args.Composite(**items))

    def restore(
        self,
        step: int | None = None,
        *,
        params: PyTree | None = None,
        opt_state: PyTree | None = None,
        ema: PyTree | None = None,
        data_iter: Iterator | None = None,
    ) -> Restored:
        """Restore `step` (None: the latest): the array items given a template of ShapeDtypeStructs
        (see `abstract`), the JSON items always. Items without a template are not read at all, so
        inference restores `ema` (or `params`) and never the optimizer state.

        Arrays land on each template leaf's sharding and dtype; `data_iter` is moved in place to
        the saved position. Raises CheckpointError naming the path if it is missing or unreadable.
        """
        self._manager.wait_until_finished()
        step = self.latest_step if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}; nothing to resume from")
        path = self.directory / str(step)
        if step not in self._manager.all_steps():
            raise CheckpointError(
                f"checkpoint {path} does not exist; available steps: {self.steps or 'none'}"
            )
        present = {p.name for p in path.iterdir() if p.is_dir()}
        templates = {name: t for name, t in (("params", params), ("opt_state", opt_state), ("ema", ema)) if t is not None}
        requested = {*templates, "meta", *(["data"] if data_iter is not None else [])}
        if missing := sorted(requested - present):
            raise CheckpointError(
                f"checkpoint {path} is incomplete or from a different setup: missing {', '.join(missing)} "
                f"(has {', '.join(sorted(present)) or 'nothing'}); it was left untouched"
            )
        try:
            items = {name: _tree_restore(path / name, t) for name, t in templates.items()}
            items["meta"] = ocp.args.JsonRestore()
            items |= {name: ocp.args.JsonRestore() for name in ("config", "norm_stats") if name in present}
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointError:
            raise
        except Exception as e:  # orbax, tensorstore, json and grain raise many types
            reason = " ".join(str(e).split())[:300]
            raise CheckpointError(
                f"checkpoint {path} could not be read ({type(e).__name__}: {reason}); it was left untouched. "
                f"Restore an earlier step (available: {self.steps}) or move this one away"
            ) from e
        if data_iter is not None:
            try:
                _restore_data_position(path / "data", data_iter)
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"checkpoint {path}: the data position could not be read ({type(e).__name__}: "
                                      f"{' '.join(str(e).split())[:200]}); it was left untouched") from e
        meta = out["meta"]
        if meta.get("step") != step:
            raise CheckpointError(f"checkpoint {path} records step {meta.get('step')}, expected {step}")
        return Restored(
            step=step, skipped=int(meta["skipped"]),
            **{k: out[k] if k in items else None for k in ("params", "opt_state", "ema", "config", "norm_stats")},
        )

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "RunCheckpoints":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
