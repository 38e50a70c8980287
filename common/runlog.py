"""Run plumbing shared by the scripts: the run block of their Args (`RunArgs`, `check_choices`), the run folder
(metrics.jsonl (+ wandb), args.json, orbax checkpoints, progress lines), and loading the π₀ a run starts from (an
openpi checkpoint or another run's folder, `load_pi0`).

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
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import pi0


@dataclasses.dataclass
class RunArgs:
    """The run block each script's `Args` starts with (flags --seed, --env, --run-dir, ...). A script redeclares the
    fields that are its own (exp_name, dataset and its default) and adds its run cadence (save/log/eval, envs)."""

    exp_name: str = "run"
    """name of this experiment (run folder and wandb)"""
    seed: int = 1
    """random seed (parameters, data order, environments)"""
    env: str = "push"
    """'push' (embedded), 'libero', or any gymnasium id"""
    env_kwargs: dict[str, str] = dataclasses.field(default_factory=dict)
    """environment options as KEY VALUE pairs, JSON values (libero: suite, task_ids, image_size, max_episode_steps)"""
    dataset: str | None = None
    """prior data: robomimic/LIBERO HDF5 (a file or a folder of them) or a LeRobot dataset folder (parquet)"""
    pi0_checkpoint: str | None = None
    """openpi checkpoint directory (params + assets/norm stats) or a run folder of these scripts; None: the
    --pi0-preset trained from scratch"""
    model_horizon: int = 0
    """π₀'s chunk length H_m when it exceeds the executed --action-horizon (openpi pi0_libero: 50, execute 5): the
    first --action-horizon actions of each chunk are executed, learned from and valued; 0: = --action-horizon"""
    pi0_preset: str = "cpu"
    """π₀ size when no checkpoint is given: cpu, pi0, pi05"""
    tokenizer: str | None = None
    """path of paligemma_tokenizer.model (openpi checkpoints); None: the built-in word tokenizer (CPU preset)"""
    track: bool = False
    """log to wandb (WANDB_MODE=offline works without network)"""
    wandb_project: str = "pi0-rl"
    """wandb project"""
    run_dir: str | None = None
    """run folder; default runs/<env>__<script>__<seed>__<time>"""
    resume: bool = False
    """continue from the last checkpoint in --run-dir"""
    fsdp_devices: int = 1
    """devices the parameters are sharded over (FSDP); the batch is split over all devices"""


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

    @classmethod
    def from_args(cls, args: RunArgs, script: str) -> Run:
        """The run of a script's Args: its run block's env, seed, run_dir, resume, track and wandb_project."""
        keys = ("env", "seed", "run_dir", "resume", "track", "wandb_project")
        return cls(args, script, **{k: getattr(args, k) for k in keys})

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
        """A periodic progress line with steps/s, ETA and the `shown` scalars (numbers or 0-d device arrays)."""
        rate = (step - start_step) / max(time.time() - start_time, 1e-9)
        eta = (total - step) / max(rate, 1e-9)
        extra = "  ".join(f"{k}={float(v):.3g}" for k, v in shown.items())
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


def check_choices(args: Any) -> None:
    """Raise ValueError naming the flag when a field of the Args dataclass typed `Literal[...]` holds another value
    (tyro already refuses one on the command line; this also covers `main(Args(...))`)."""
    hints = typing.get_type_hints(type(args))
    for f in dataclasses.fields(args):
        choices, value = typing.get_args(hints[f.name]), getattr(args, f.name)
        if typing.get_origin(hints[f.name]) is typing.Literal and value not in choices:
            raise ValueError(f"--{f.name.replace('_', '-')} {value!r}: choose one of {choices}")


def load_pi0(
    path: str, action_horizon: int, *, asset_id: str | None = None, run_config: dict[str, Any] | None = None
) -> tuple[pi0.Params, pi0.Pi0Config, dict[str, dict[str, np.ndarray]]]:
    """(π₀ parameters, `pi0.Pi0Config`, norm stats) to start from (--pi0-checkpoint): an openpi checkpoint directory
    or a run folder of these scripts (one with a checkpoints/ folder).

    openpi: `<path>/params` and `<path>/assets/<asset_id>/norm_stats.json` (`pi0.load_openpi_params`,
    `pi0.load_norm_stats`); the config read off the parameter shapes, with prompts of up to 48 tokens.
    Run folder: its latest checkpoint (`Run.save`), with the π₀ parameters (openpi layout) at state["params"]
    (chunk_awr.py, flow_ppo.py) or state["pi"] (acrlpd_pi0.py) and the statistics at extra["norm_stats"] =
    {"state": {...}, "actions": {...}} (`pi0.normalize`'s layout); the config read off the shapes and `run_config`,
    the fields the run chose that the shapes do not fix (max_token_len, default 48; state_dim; cameras).
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        params, cfg = pi0.load_openpi_params(path, action_horizon=action_horizon, max_token_len=48)
        return params, cfg, pi0.load_norm_stats(path, asset_id)
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(os.path.join(path, "checkpoints"))
    step = mgr.latest_step()
    if step is None:
        raise FileNotFoundError(f"--pi0-checkpoint {path}: its checkpoints/ folder is empty")
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), extra=ocp.args.JsonRestore()))
    state, extra = out["state"], out["extra"]
    key = next((k for k in ("params", "pi") if isinstance(state, dict) and k in state), None)
    if key is None or "norm_stats" not in extra:
        raise ValueError(
            f"--pi0-checkpoint {path}: expected the π₀ params at state['params'] (chunk_awr, flow_ppo) or "
            f"state['pi'] (acrlpd_pi0) and extra['norm_stats']; found state keys "
            f"{list(state) if isinstance(state, dict) else type(state)}"
        )
    params = jax.tree.map(jnp.asarray, state[key])
    cfg = pi0.config_from_params(params, action_horizon=action_horizon, **{"max_token_len": 48, **(run_config or {})})
    stats = {k: {s: np.asarray(x, np.float32) for s, x in v.items()} for k, v in extra["norm_stats"].items()}
    return params, cfg, stats


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
