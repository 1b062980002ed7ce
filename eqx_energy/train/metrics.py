"""Host-side metrics: JSONL in the run dir, a progress bar, steps/s and data-wait timing,
optional wandb, and PNG plots of the main curves at the end.

    timed = DataWaitTimer(batches)
    with MetricsLogger(run_dir, total_steps=cfg.train.steps, start_step=step) as log:
        for step in ...:
            batch = next(timed)
            ...
            if step % cfg.train.log_interval == 0:
                log.log(step, metrics, data_wait_s=timed.pop())
    # close() wrote <run_dir>/plots/*.png

Only process 0 writes. Resuming at `start_step` drops JSONL lines after it (they belong to the
interrupted stretch that is about to be redone), and a last line cut short by a kill, so the file
matches an uninterrupted run.
"""

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from eqx_energy._files import atomic_write

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# Panel name -> predicate over a metric key; one PNG per panel that has data.
PANELS = {
    "loss": lambda k: k.endswith("loss"),
    "energy": lambda k: k.endswith(("e_pos", "e_neg")),
    "accuracy": lambda k: k.endswith("accuracy"),
    "lr": lambda k: k.startswith("lr") or k.split("/")[-1].startswith("lr"),  # lr, lr/energy, opt/lr_x
    "grad_norm": lambda k: "grad_norm" in k,
}
_BAR_KEYS = ("loss", "accuracy", "skipped")


class DataWaitTimer:
    """Wraps a batch iterator and adds up the seconds spent waiting in `next`."""

    def __init__(self, iterator: Iterator):
        self._iterator = iterator
        self._waited = 0.0

    def __iter__(self) -> "DataWaitTimer":
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self._iterator)
        finally:
            self._waited += time.perf_counter() - start

    def pop(self) -> float:
        """Seconds waited since the last `pop` (or the start)."""
        waited, self._waited = self._waited, 0.0
        return waited


def _host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    values = jax.device_get(dict(metrics))
    out = {}
    for key, value in values.items():
        array = np.asarray(value)
        if array.size != 1:
            raise ValueError(
                f"MetricsLogger.log: metric {key!r} must be a scalar, got shape {array.shape}; "
                "reduce it first"
            )
        out[key] = float(array.reshape(()))
    return out


def read_metrics(path: str | os.PathLike) -> list[dict[str, int | float]]:
    """The records of a metrics JSONL file, in order. A last line cut short (the writer was killed
    mid-line) is dropped with a warning; a bad line anywhere else raises ValueError."""
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON ({err}); the metrics file is corrupt") from err
            logger.warning("%s: dropping its last line, cut short (%d chars): %s", path, len(line), err)
    return records


class MetricsLogger:
    """Writes one JSON line per `log` call to `<run_dir>/metrics.jsonl`, drives the progress bar
    and (if `use_wandb`) wandb; `close()` draws the plots."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        use_wandb: bool = False,
        config: Mapping[str, Any] | None = None,
        progress: bool | None = None,  # None: a bar when stderr is a terminal, log lines otherwise
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = jax.process_index() == 0
        self._last_step, self._last_time = start_step, time.perf_counter()
        self._wandb = None
        self._bar = None
        self._file = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._file = open(self.path, "a")
        if progress is not False:
            bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                disable=None if progress is None else False,
            )
            self._bar = None if bar.disable else bar
        if use_wandb:
            self._wandb = self._start_wandb(config)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def _start_wandb(self, config: Mapping[str, Any] | None) -> Any:
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "train.wandb=true needs the wandb package: `pip install wandb`, or set train.wandb=false"
            ) from None
        mode = os.environ.get("WANDB_MODE", "offline")  # never needs network unless asked for
        return wandb.init(dir=str(self.run_dir), config=dict(config or {}), mode=mode, name=self.run_dir.name)

    def log(
        self, step: int, metrics: Mapping[str, Any], *, data_wait_s: float | None = None
    ) -> dict[str, int | float]:
        """Record scalar `metrics` at `step` plus steps/s since the previous call (and the data-wait
        time and its fraction of that interval, if given). Returns the record."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        record = {"step": step, "time": time.time(), **_host_scalars(metrics)}
        record["steps_per_s"] = (step - self._last_step) / elapsed
        if data_wait_s is not None:
            record["data_wait_s"] = data_wait_s
            record["data_wait_frac"] = data_wait_s / elapsed
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            shown = {k: v for k, v in record.items() if k in _BAR_KEYS or PANELS["lr"](k)}
            text = " ".join(f"{k}={v:.4g}" for k, v in {**shown, "steps/s": record["steps_per_s"]}.items())
            if self._bar is not None:
                self._bar.update(step - self._last_step)
                self._bar.set_postfix_str(text, refresh=False)
            else:
                logger.info("step %d %s", step, text)
            if self._wandb is not None:
                self._wandb.log(record, step=step)
        self._last_step, self._last_time = step, now
        return record

    def close(self) -> list[Path]:
        """Close the file, bar and wandb; write the plots. Returns the PNG paths."""
        if not self.enabled or self._file is None:
            return []
        self._file.close()
        self._file = None
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        return plot_metrics(self.path, self.run_dir / "plots")

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_metrics(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per panel of PANELS (loss, energy e_pos vs e_neg, accuracy, lr, grad norm) that has
    data in the JSONL file `path`; every matching metric is a curve against step."""
    from matplotlib.figure import Figure  # Agg canvas, no global pyplot state

    records = read_metrics(path)
    keys = sorted({k for r in records for k in r} - {"step", "time"})
    out_dir = Path(out_dir)
    written = []
    for panel, match in PANELS.items():
        curves = [k for k in keys if match(k)]
        if not curves:
            continue
        fig = Figure(figsize=(6, 3.5), layout="constrained")
        ax = fig.add_subplot()
        for key in curves:
            points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=key)
        ax.set_xlabel("step")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        out_dir.mkdir(parents=True, exist_ok=True)
        written.append(out_dir / f"{panel}.png")
        fig.savefig(written[-1], dpi=100)
    return written
