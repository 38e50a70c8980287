"""Run folder plumbing shared by the scripts: metrics.jsonl (+ wandb), args.json, orbax checkpoints, progress lines.

runs/<env>__<script>__<seed>__<time>/
    args.json        the Args the run started with
    metrics.jsonl    one JSON object per log step: {"step": ..., "losses/...": ..., "eval/...": ...}
    checkpoints/     orbax CheckpointManager: {"state": train state pytree, "extra": JSON (norm stats, step, ...)}
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np


class Run:
    """One training run's folder. `resume=True` reopens `run_dir` and `restore()` returns its last checkpoint."""

    def __init__(
        self,
        args: Any,
        script: str,
        *,
        env: str,
        seed: int,
        run_dir: str | None = None,
        resume: bool = False,
        track: bool = False,
        wandb_project: str = "pi0-rl",
        keep: int = 2,
    ):
        if resume and not run_dir:
            raise ValueError(
                "--resume needs --run-dir: the run folder to continue (e.g. runs/push__acrlpd_pi0__1__...)"
            )
        if resume and not os.path.isdir(os.path.join(run_dir, "checkpoints")):
            raise FileNotFoundError(f"--resume: no checkpoints in {run_dir}; start it without --resume first")
        name = f"{env.replace(':', '_').replace('/', '_')}__{script}__{seed}__{int(time.time())}"
        self.dir = os.path.abspath(run_dir or os.path.join("runs", name))
        os.makedirs(self.dir, exist_ok=True)
        self.is_main = jax.process_index() == 0
        if self.is_main and not resume:
            with open(os.path.join(self.dir, "args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=2, default=str)
        self._metrics = open(os.path.join(self.dir, "metrics.jsonl"), "a") if self.is_main else None
        self._wandb = None
        if track and self.is_main:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("--track needs wandb: pip install wandb") from e
            self._wandb = wandb.init(
                project=wandb_project,
                name=os.path.basename(self.dir),
                dir=self.dir,
                config=dataclasses.asdict(args),
                resume="allow",
                id=os.path.basename(self.dir),
            )
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._mgr = ocp.CheckpointManager(
            os.path.join(self.dir, "checkpoints"), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )
        self._t0, self._last = time.time(), {}

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write namespaced scalar metrics (pull them from the device once, here)."""
        row = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        row = {"step": int(step), **row, "time/elapsed_s": time.time() - self._t0}
        self._last.update(row)
        if self._metrics:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()
        if self._wandb:
            self._wandb.log(row, step=int(step))

    def progress(self, step: int, total: int, phase: str, start_step: int, start_time: float, **shown: float) -> None:
        """A periodic progress line with steps/s and ETA."""
        rate = (step - start_step) / max(time.time() - start_time, 1e-9)
        eta = (total - step) / max(rate, 1e-9)
        extra = "  ".join(f"{k}={v:.3g}" for k, v in shown.items())
        print(f"[{phase}] step {step}/{total}  {rate:.1f} steps/s  ETA {eta / 60:.1f} min  {extra}", flush=True)

    def save(self, step: int, state: Any, extra: dict[str, Any]) -> None:
        """An orbax checkpoint of the train state and a JSON side car (norm stats, phase, counters)."""
        ocp = self._ocp
        self._mgr.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(_jsonable(extra)))
        )
        self._mgr.wait_until_finished()

    def restore(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state shaped like `target`, extra) of the latest checkpoint, or None if there is none."""
        step = self._mgr.latest_step()
        if step is None:
            return None
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._mgr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore())
        )
        return step, out["state"], out["extra"]

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
        if self._metrics:
            self._metrics.close()
        if self._wandb:
            self._wandb.finish()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
