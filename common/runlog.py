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
    """The run block every script's `Args` starts with, the same flags in the three scripts. A script's own fields
    follow, in the same order everywhere: cadence (save/log/eval, envs), model, algorithm."""

    exp_name: str = ""
    """name of this experiment: the run folder runs/<env>__<exp_name>__<seed>__<time> and wandb's group ('' = the
    script's name)"""
    seed: int = 1
    """random seed (parameters, data order, environments)"""
    env: str = "push"
    """'push' (embedded), 'libero', or any gymnasium id"""
    env_kwargs: dict[str, str] = dataclasses.field(default_factory=dict)
    """environment options as KEY VALUE pairs, JSON values (libero: suite, task_ids, image_size, max_episode_steps)"""
    dataset: str | None = None
    """prior data: robomimic/LIBERO HDF5 (a file or a folder of them) or a LeRobot dataset folder (parquet); push:
    the script's demonstrator data, generated and cached on first use"""
    pi0_checkpoint: str | None = None
    """openpi checkpoint directory (params + assets/norm stats) or a run folder of these scripts; None: the
    --pi0-preset trained from scratch"""
    asset_id: str | None = None
    """norm-stats asset inside an openpi --pi0-checkpoint (e.g. physical-intelligence/libero)"""
    pi0_preset: str = "cpu"
    """π₀ size when no checkpoint is given: cpu, pi0, pi05"""
    tokenizer: str | None = None
    """path of paligemma_tokenizer.model (openpi checkpoints); None: the built-in word tokenizer (CPU preset)"""
    model_horizon: int = 0
    """π₀'s chunk length H_m when it exceeds the executed --action-horizon (openpi pi0_libero: 50, execute 5): the
    first --action-horizon actions of each chunk are executed, learned from and valued; 0: = --action-horizon"""
    track: bool = False
    """log to wandb (WANDB_MODE=offline works without network)"""
    wandb_project: str = "pi0-rl"
    """wandb project"""
    run_dir: str | None = None
    """run folder; default runs/<env>__<exp_name>__<seed>__<time>"""
    resume: bool = False
    """continue from the last checkpoint in --run-dir"""
    fsdp_devices: int = 1
    """devices the parameters are sharded over (FSDP); the batch is split over all devices"""

    def check_run(self, needs_data: bool = True) -> None:
        """Refuse a run block that cannot start: a `Literal` flag outside its choices (`check_choices`), or an env
        other than push (the only one with a default dataset) without --dataset when the run `needs_data`."""
        check_choices(self)
        if needs_data and self.dataset is None and self.env != "push":
            raise ValueError(f"--env {self.env}: pass --dataset (prior data: robomimic/LIBERO HDF5 or LeRobot folder)")

    def pi0_flags(self) -> dict[str, Any]:
        """The run block's flags that choose the π₀ a run starts from, as `make_policy`'s arguments."""
        return dict(env_name=self.env, checkpoint=self.pi0_checkpoint, preset=self.pi0_preset,
                    tokenizer=self.tokenizer, asset_id=self.asset_id, model_horizon=self.model_horizon)  # fmt: skip


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
                group=script,
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
        self._t0 = time.time()

    @classmethod
    def from_args(cls, args: RunArgs, script: str) -> Run:
        """The run of a script's Args (its run block): named --exp-name, or the script's name."""
        keys = ("env", "seed", "run_dir", "resume", "track", "wandb_project")
        return cls(args, args.exp_name or script, **{k: getattr(args, k) for k in keys})

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write namespaced scalar metrics (pull them from the device once, here)."""
        row = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        row = {"step": int(step), **row, "time/elapsed_s": time.time() - self._t0}
        if self._metrics:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()
        if self._wandb:
            self._wandb.log(row, step=int(step))

    def report(self, step: int, metrics: dict[str, Any], phase: str, total: int, start: tuple[int, float],
               show: tuple[str, ...]) -> None:  # fmt: skip
        """`log` the metrics with the phase's rate (time/{phase}_steps_per_s, since `start` = (step, time)) and print
        a progress line (`progress`) with the `show` metrics that are there."""
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics[f"time/{phase}_steps_per_s"] = (step - start[0]) / max(time.time() - start[1], 1e-9)
        self.log(step, metrics)
        self.progress(step, total, phase, *start, **{k.split("/")[-1]: metrics[k] for k in show if k in metrics})

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


def check_at_least(args: Any, minimum: int, *names: str) -> None:
    """Raise ValueError naming the flag when one of the integer fields `names` of `args` is below `minimum`."""
    for name in names:
        if getattr(args, name) < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ {minimum} (got {getattr(args, name)})")


def load_pi0(
    path: str, action_horizon: int, *, asset_id: str | None = None, run_config: dict[str, Any] | None = None
) -> tuple[pi0.Params, pi0.Pi0Config, dict[str, dict[str, np.ndarray]]]:
    """(π₀ parameters, `pi0.Pi0Config`, norm stats) to start from (--pi0-checkpoint): an openpi checkpoint directory
    or a run folder of these scripts (one with a checkpoints/ folder).

    openpi: `<path>/params` and `<path>/assets/<asset_id>/norm_stats.json` (`pi0.load_openpi_params`,
    `pi0.load_norm_stats`); the config read off the parameter shapes, with prompts of up to 48 tokens.
    Run folder: its latest checkpoint (`Run.save`), with the π₀ parameters (openpi layout) at state["params"]
    (state["pi"] in acrlpd_pi0.py folders written before 2026-11-30) and the statistics at extra["norm_stats"] =
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
            f"--pi0-checkpoint {path}: expected the π₀ params at state['params'] and extra['norm_stats'] (a run "
            f"folder of acrlpd_pi0.py, chunk_awr.py or flow_ppo.py); found state keys "
            f"{list(state) if isinstance(state, dict) else type(state)}"
        )
    params = jax.tree.map(jnp.asarray, state[key])
    cfg = pi0.config_from_params(params, action_horizon=action_horizon, **{"max_token_len": 48, **(run_config or {})})
    stats = {k: {s: np.asarray(x, np.float32) for s, x in v.items()} for k, v in extra["norm_stats"].items()}
    return params, cfg, stats


def crossed(prev: int, step: int, every: int) -> bool:
    """Whether the steps (prev, step] passed a multiple of `every` (0: never): the cadence test of every script's
    log, evaluate and save, for loops that advance several steps at a time."""
    return every > 0 and step // every > prev // every


@dataclasses.dataclass
class Policy:
    """π₀ as a run starts it: the model, its parameters (loaded, or initialised from the given key), the plumbing
    between the env and π₀ (`io`) and the norm stats that plumbing uses (saved with every checkpoint)."""

    model: pi0.Pi0
    params: pi0.Params
    io: pi0.EnvIO
    stats: dict[str, dict[str, np.ndarray]]


def make_policy(
    env: Any,
    prompts: list[str],
    data_stats: dict[str, dict[str, np.ndarray]] | None,
    rng: jax.Array,
    *,
    env_name: str,
    checkpoint: str | None,
    preset: str,
    tokenizer: str | None,
    asset_id: str | None,
    action_horizon: int,
    model_horizon: int,
) -> Policy:
    """The π₀ a run starts from (the run block's flags, passed explicitly): `checkpoint` (openpi or a run folder,
    `load_pi0`, with its norm stats) or the `preset` sized to `env`, initialised from `rng`, with `data_stats` (the
    prior data's); prompts tokenised once into a table (`prompts`: the env's first, then the data's new ones); π₀'s
    chunk `model_horizon` (0: `action_horizon`) of which the first `action_horizon` actions are executed. An openpi
    checkpoint used on LIBERO predicts the first six dims relative to the state when its stats say so
    (`libero.openpi_delta_dims`)."""
    cams = tuple(env.camera_names)
    H_m = model_horizon or action_horizon
    if checkpoint:  # what a run folder's shapes leave open comes from the preset and the env
        rc = dict(max_token_len=pi0.PRESETS[preset].max_token_len, state_dim=env.state_dim, cameras=cams)
        params, cfg, stats = load_pi0(checkpoint, H_m, asset_id=asset_id, run_config=rc)
        cfg = dataclasses.replace(cfg, cameras=cams or cfg.cameras)  # the env's cameras, where it has any
    else:
        if data_stats is None:
            raise ValueError("π₀ from scratch needs prior data for its norm stats: pass --dataset or --pi0-checkpoint")
        params, stats = None, data_stats
        shape = dict(action_dim=env.action_dim, state_dim=env.state_dim, action_horizon=H_m, cameras=cams)
        cfg = pi0.make_config(preset, **shape)
    table = pi0.make_prompt_table(prompts, pi0.make_tokenizer(tokenizer, cfg))
    delta = 0
    if checkpoint and env_name == "libero":
        from common import libero

        delta = libero.openpi_delta_dims(stats)
    io = pi0.EnvIO(cfg, table, stats, env.action_dim, delta, quantile=cfg.pi05, horizon=action_horizon)
    model = pi0.Pi0(cfg)
    return Policy(model, model.init(rng) if params is None else params, io, stats)


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
