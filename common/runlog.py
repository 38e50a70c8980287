"""Runs: the run block of the scripts' Args, the run folder (metrics, args.json, orbax checkpoints, resume, stopping
on SIGINT/SIGTERM), one-line errors, and the π₀ a run starts from (`make_policy`).

runs/<env>__<exp_name>__<seed>__<time>/
    .lock            held (flock) by the process that runs in the folder (process 0 for all), for the run's life; it
                     records that process (pid, host, start time) for a refused one to name it
    args.json        the Args the run started with (+ "_script"); `--resume` reads them back
    metrics.jsonl    one JSON object per log step: {"step": ..., "losses/...": ..., "eval/...": ...}
    checkpoints/     orbax CheckpointManager: {"state": train state pytree, "extra": JSON (norm stats, counters)}
    host/            <step>.p<i>.npz per checkpoint step and process: what lives on the host (replay buffer, env
                     state, observation), written before the orbax checkpoint of the same step

A run folder belongs to one run, and one process runs in it at a time: a second one (a --resume of a running run, a
new run in a folder just taken) is refused with one line naming the first. Every file is replaced atomically (a
temporary file, then `os.replace`; orbax renames a step's folder), so a kill at any moment leaves the last complete
checkpoint and its host file. Resuming truncates metrics.jsonl to the restored step: an interrupted and resumed run
logs each step once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import typing
import warnings
import weakref
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from common import RunError, mesh, pi0

DATASET_KINDS = "prior data: robomimic/LIBERO HDF5, a LeRobot folder, an OGBench/D4RL .npz or a Minari folder"

# flags a resumed run may change: where it runs and logs, not what it computes
RESUME_MAY_CHANGE = ("resume", "run_dir", "track", "wandb_project", "fsdp_devices", "eval_envs", "remat")
RESUME_MAY_CHANGE += ("capture_video", "video_episodes")
# flags added since runs were first saved, and the value that gives a run saved without them its old behaviour
ADDED_FLAGS = {"ema_decay": 0.0}


@dataclasses.dataclass
class RunArgs:
    """The run block every script's `Args` starts with, the same flags and defaults in every script. A script's own
    fields follow, in the same order everywhere: env and cadence, model, algorithm."""

    exp_name: str = ""
    """name of this experiment: the run folder runs/<env>__<exp_name>__<seed>__<time> and wandb's group ('' = the
    script's name)"""
    seed: int = 1
    """random seed (parameters, data order, environments)"""
    env: str = "push"
    """'push' (embedded), 'libero', or any gymnasium id"""
    env_kwargs: dict[str, str] = dataclasses.field(default_factory=dict)
    """environment options as KEY VALUE pairs, JSON values (libero: suite, task_ids, image_size, max_episode_steps;
    any env: reward_scale A reward_shift B, rewards A·r + B in the env and the dataset)"""
    dataset: str | None = None
    """prior data: robomimic/LIBERO HDF5 (a file or a folder of them), a LeRobot dataset folder (parquet), an
    OGBench/D4RL .npz or a Minari dataset folder; push: the demonstrator's data, generated and cached on first use"""
    pi0_checkpoint: str | None = None
    """openpi checkpoint directory (params + assets/norm stats) or a run folder of these scripts; None: the
    --pi0-preset trained from scratch"""
    asset_id: str | None = None
    """norm-stats asset inside an openpi --pi0-checkpoint (e.g. physical-intelligence/libero)"""
    pi0_preset: Literal["cpu", "pi0", "pi05"] = "cpu"
    """π₀ size: cpu, pi0, pi05; with --env libero, pi0 and pi05 start from openpi's pi0_libero / pi05_libero found in
    its cache unless --pi0-checkpoint says otherwise"""
    tokenizer: str | None = None
    """path of paligemma_tokenizer.model (openpi checkpoints); None: the built-in word tokenizer (CPU preset)"""
    discrete_state: bool | None = None
    """π₀.₅: the state as 256-bin text in the prompt (openpi's discrete_state_input); None: as the checkpoint was
    trained (recorded by our runs and exports; openpi's pi05_libero: off; other π₀.₅: on)"""
    precision: Literal["float32", "bfloat16"] | None = None
    """π₀'s compute dtype; its parameters and optimizer state stay float32 (openpi's mixed precision). None: bfloat16
    for a full-size π₀ (the pi0 / pi05 presets, openpi checkpoints), float32 for the CPU preset"""
    remat: Literal[pi0.REMAT_POLICIES] | None = None
    """recompute each scanned layer (Gemma, SigLIP) in the backward pass instead of keeping its activations: a
    jax.checkpoint_policies name (nothing_saveable: keep nothing, openpi's; dots_saveable: keep matmul outputs) or
    none. None: nothing_saveable for a full-size π₀, none for the CPU preset"""
    model_horizon: int = 0
    """π₀'s chunk length H_m when it exceeds the executed --action-horizon (openpi pi0_libero: 50, execute 5): the
    first --action-horizon actions of each chunk are executed, learned from and valued; 0: = --action-horizon"""
    track: bool = False
    """log to wandb (WANDB_MODE=offline works without network)"""
    wandb_project: str = "pi0-rl"
    """wandb project"""
    run_dir: str | None = None
    """run folder (new or empty); default runs/<env>__<exp_name>__<seed>__<time>"""
    resume: bool = False
    """continue the run in --run-dir from its last checkpoint, with its own flags (args.json)"""
    fsdp_devices: int = 1
    """devices the parameters are sharded over (FSDP); the batch is split over all devices"""
    capture_video: bool = False
    """write the first --video-episodes episodes of each evaluated policy as MP4 under <run>/videos (and to wandb
    with --track); needs pip install -e '.[video]'"""
    video_episodes: int = 2
    """episodes recorded per evaluated policy with --capture-video"""
    max_grad_norm: float = 1.0
    """global-norm clip of π₀'s gradient"""

    def check_run(self, needs_data: bool = True) -> None:
        """Refuse a run block that cannot start, before any work: a `Literal` flag outside its choices, an env other
        than push (the only one with a default dataset) without --dataset when the run `needs_data`, paths that do
        not exist or are of the wrong kind, an --exp-name that is a path, a run folder that is a file, that another
        process runs in, that holds a run (a new run) or that cannot be written (`check_run_folder`)."""
        check_choices(self)
        if needs_data and self.dataset is None and self.env != "push":
            raise RunError(f"--env {self.env}: pass --dataset ({DATASET_KINDS})")
        if self.dataset is not None and not os.path.exists(os.path.expanduser(self.dataset)):
            raise RunError(f"--dataset {self.dataset}: no such file or folder")
        if self.pi0_checkpoint is not None and not os.path.isdir(os.path.expanduser(self.pi0_checkpoint)):
            what = "is a file" if os.path.exists(os.path.expanduser(self.pi0_checkpoint)) else "does not exist"
            raise RunError(
                f"--pi0-checkpoint {self.pi0_checkpoint} {what}: pass an openpi checkpoint directory "
                "(holding params/ and assets/) or a run folder of these scripts"
            )
        if self.tokenizer is not None and not os.path.isfile(os.path.expanduser(self.tokenizer)):
            raise RunError(f"--tokenizer {self.tokenizer}: no such file (openpi's paligemma_tokenizer.model)")
        if self.fsdp_devices < 1:
            raise RunError(f"--fsdp-devices must be ≥ 1 (got {self.fsdp_devices})")
        if os.sep in self.exp_name or (os.altsep and os.altsep in self.exp_name) or self.exp_name in (".", ".."):
            raise RunError(
                f"--exp-name {self.exp_name}: a name, not a path (no '{os.sep}', not '.' or '..'); it names the "
                "run folder runs/<env>__<exp-name>__<seed>__<time>: pass --run-dir to put the run elsewhere"
            )
        check_at_least(self, 0, "video_episodes")
        if self.capture_video:  # the writer is there before any work
            from common import video  # the video extra, imported only when asked for

            video.require_writer()
        check_run_folder(self.run_dir, self.resume)

    @property
    def recorded_episodes(self) -> int:
        """Episodes an evaluation records per policy: --video-episodes with --capture-video, else none."""
        return self.video_episodes if self.capture_video else 0

    def pi0_flags(self) -> dict[str, Any]:
        """The run block's flags that choose the π₀ a run starts from, as `make_policy`'s arguments; a resumed run's
        norm stats are its own (its checkpoint's), whatever the data or the checkpoint hold now."""
        return dict(
            env_name=self.env,
            checkpoint=self.pi0_checkpoint,
            preset=self.pi0_preset,
            tokenizer=self.tokenizer,
            asset_id=self.asset_id,
            model_horizon=self.model_horizon,
            discrete_state=self.discrete_state,
            precision=self.precision,
            remat=self.remat,
            resume_dir=self.run_dir if self.resume else None,
        )


LOCK_FILE = ".lock"  # in a run folder: held by the process that runs there (`lock_folder`)


def check_run_folder(run_dir: str | None, resume: bool) -> None:
    """Refuse, with one line and before any work, a run folder (`run_dir`, None: a new runs/<...> in the current
    folder) that is a file, that another process runs in (its lock is held), that holds a run when this one is new,
    or that cannot be created or written. Nothing in it is changed; only a file created and removed at once in the
    folder to write in tells whether it can be written."""
    label = f"--run-dir {run_dir}" if run_dir else "the run folder runs/<env>__<name>__<seed>__<time>"
    folder, fix = run_dir or "runs", "pick a writable folder" if run_dir else "pass --run-dir in a writable folder"
    if run_dir and os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunError(f"--run-dir {run_dir} is a file, not a folder: pick a folder (new, or empty)")
    if run_dir and os.path.isdir(run_dir):
        if who := holder(run_dir):
            raise RunError(f"--run-dir {run_dir} is in use by {who}: wait for it to end, or pick another folder")
        if not resume and [name for name in os.listdir(run_dir) if name != LOCK_FILE]:
            raise RunError(
                f"--run-dir {run_dir} is not empty (a run folder belongs to one run): continue that "
                f"run with --resume --run-dir {run_dir}, or pick a new folder"
            )
    where = os.path.abspath(folder)  # the folder itself, or the nearest existing one it would be created in
    while not os.path.lexists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise RunError(f"{label}: {where} is a file, not a folder: {fix}")
    if why := _unwritable(where):
        raise RunError(f"{label}: cannot write in {where} ({why}): {fix}")


def _unwritable(folder: str) -> str | None:
    """Why a file cannot be created in `folder` (e.g. "read-only file system", "permission denied"), or None: tried,
    since access bits do not tell everything (root, network file systems)."""
    try:
        fd, path = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.remove(path)
    except OSError as e:
        return (e.strerror or type(e).__name__).lower()
    return None


def holder(folder: str) -> str | None:
    """The process that holds `folder`'s lock ("pid P on host H (script.py, started T)"), None when none does. Probes
    with a shared lock, released at once: probes do not refuse each other, and nothing in the folder changes."""
    try:
        fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file: no run of these scripts took the folder
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _owner(fd)
    finally:
        os.close(fd)  # releases the probe's shared lock
    return None


def lock_folder(folder: str, script: str, label: str, wait: float = 1.0) -> int:
    """Take `folder`'s lock for this process (an exclusive flock on its .lock, which then records this process) and
    return the open file descriptor that holds it: the lock lasts until it is closed, or the process ends (the OS
    releases it, kill -9 included). RunError naming the holder when another process holds it after `wait` seconds
    (a probe's shared lock lasts microseconds)."""
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                who = _owner(fd)
                os.close(fd)
                raise RunError(f"{label} is in use by {who}: wait for it to end, or pick another folder") from None
            time.sleep(0.05)
    me = dict(pid=os.getpid(), host=socket.gethostname(), script=script, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def _owner(fd: int) -> str:
    """The process a held lock file records (it writes itself there just after taking the lock: wait for it)."""
    for _ in range(20):
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            me = json.loads(os.pread(fd, 4096, 0))
            return f"pid {me['pid']} on host {me['host']} ({me['script']}.py, started {me['started']})"
        time.sleep(0.05)
    return "another process (which has not written its pid yet)"


def resumed(args: Any, script: str, defaults: Any = None) -> Any:
    """`args` as the run in --run-dir was started (its args.json) when --resume is set; else `args` unchanged.

    Flags given again with a value other than their default (`defaults`' field, else the dataclass field's) must
    agree with the run's (else one RunError naming them); only `RESUME_MAY_CHANGE` are taken from `args`. A folder
    of another script, or none, is refused."""
    if not args.resume:
        return args
    if not args.run_dir:
        raise RunError("--resume needs --run-dir: the run folder to continue (runs/<env>__<name>__<seed>__<time>)")
    file = os.path.join(args.run_dir, "args.json")
    try:
        with open(file) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise RunError(
            f"--resume --run-dir {args.run_dir}: no args.json there, so not a run folder of these "
            "scripts; pass the folder that holds args.json and checkpoints/"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{file}: unreadable ({e}); the run cannot be resumed with its flags") from None
    owner = saved.pop("_script", None)
    fields = {f.name: f for f in dataclasses.fields(args)}
    if owner == script and (gone := sorted(set(saved) - set(fields))):
        raise RunError(
            f"--run-dir {args.run_dir} was started by another version of {script}.py (flags this one does not have: "
            f"{', '.join('--' + g.replace('_', '-') for g in gone)}); resume it with that version, or start a new run"
        )
    if owner not in (None, script) or set(saved) - set(fields):  # a flag added since the run started: its default
        other = f"{owner}.py" if owner else "another script"
        raise RunError(
            f"--run-dir {args.run_dir} is a run of {other}, not {script}.py: resume it with that script, "
            "or pick another folder"
        )
    values, clash = {}, []
    for name, f in fields.items():
        if defaults is not None:
            default = getattr(defaults, name)
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        given, value = getattr(args, name), saved.get(name, ADDED_FLAGS.get(name, default))
        value = tuple(value) if isinstance(value, list) else value
        if name in RESUME_MAY_CHANGE:
            value = given
        elif given != default and given != value:
            clash.append(f"--{name.replace('_', '-')} {given} (the run has {value})")
        values[name] = value
    if clash:
        raise RunError(
            f"--resume: {', '.join(clash)}; a resumed run keeps its own flags (args.json): drop them, or "
            "start a new run in another --run-dir"
        )
    return dataclasses.replace(args, **values)


def configured(configs: dict[str, Any], env: str, **overrides: Any) -> Any:
    """The named config of `env` (configs["gym"] for any gymnasium id not named) with `env` and `overrides` set."""
    return dataclasses.replace(configs.get(env, configs["gym"]), env=env, **overrides)


def cli(args_type: type, configs: dict[str, Any], argv: list[str] | None = None) -> Any:
    """Parse the command line on top of the config of the --env it names (push when none): `--help` then shows that
    config's values, and every other flag overrides them."""
    argv = sys.argv[1:] if argv is None else argv
    env = "push"
    for i, a in enumerate(argv):
        if a == "--env" and i + 1 < len(argv):
            env = argv[i + 1]
        elif a.startswith("--env="):
            env = a.split("=", 1)[1]
    return tyro.cli(args_type, default=configured(configs, env), args=argv)


def prepared(args: Any, script: str, configs: dict[str, Any], *, data_with_checkpoint: str) -> Any:
    """The flags a run starts with, the first line of every script's `check`: the resumed run's own (`resumed`, the
    config of --env giving the defaults), LIBERO's inputs found in openpi's and LeRobot's caches (`located`), and the
    run block checked (`RunArgs.check_run`); it prints where the env's config differs from the defaults. Prior data
    is always needed without a checkpoint; with one, `data_with_checkpoint` says: "needed", "optional" (used when
    there is some) or "unused"."""
    args = resumed(args, script, configured(configs, args.env))
    args = _located(args, data_with_checkpoint)
    if args.env not in ("push", "libero"):  # the env id and its spaces first: what else the run needs depends on it
        from common import gymenv

        gymenv.check_env(args.env)
    named, base = configs.get(args.env, configs["gym"]), type(args)()
    changed = [f.name for f in dataclasses.fields(base) if getattr(named, f.name) != getattr(base, f.name)]
    changed = [name for name in changed if name != "env"]
    if changed:
        flags = " ".join(f"--{name.replace('_', '-')} {getattr(named, name)}" for name in changed)
        print(f"config {args.env if args.env in configs else 'gym'}: {flags} (the rest: the defaults, see --help)")
    args.check_run(needs_data=not args.pi0_checkpoint or data_with_checkpoint == "needed")
    return args


def _located(args: Any, data_with_checkpoint: str) -> Any:
    """`openpi.located` where a run uses openpi's caches or a checkpoint (--env libero, --pi0-checkpoint); else the
    preset alone."""
    if args.env != "libero" and not args.pi0_checkpoint:
        return dataclasses.replace(args, pi0_preset=args.pi0_preset or "cpu")
    from common import openpi

    return openpi.located(args, data_with_checkpoint=data_with_checkpoint)


class Run:
    """One run's folder (module docstring); --resume reopens it and `restore()` returns its last checkpoint. Until
    `close()` the first SIGINT or SIGTERM sets `stopping`: the next `save` then exits with status 0 and prints the
    resume command; a second signal acts as usual. On several processes every process saves and restores the orbax
    checkpoint (a collective) and its own host file; process 0 alone writes args.json, metrics and progress lines.
    Process 0 holds the folder's lock (`lock_folder`) for all from before anything is written there until `close()`:
    a second process on the folder is refused (RunError naming the first) with the folder as it was."""

    def __init__(self, args: RunArgs, script: str, keep: int = 2):
        self.script, self.resume, self.is_main = script, args.resume, jax.process_index() == 0
        name = args.exp_name or script  # named --exp-name, or the script's name
        self._unlock: typing.Callable[[], Any] = lambda: None
        # process 0 creates the folder and takes its lock, for all; every process gets its folder or its refusal
        run_dir, refused = mesh.agreed(self._claim(args, name) if self.is_main else None)
        if refused:
            raise RunError(refused)
        self.dir = os.path.abspath(run_dir)
        try:
            self._open(args, name, keep)
        except BaseException:
            self._unlock()
            raise

    def _claim(self, args: RunArgs, name: str) -> tuple[str, str | None]:
        """(the run folder, None) once it exists and this process holds its lock; (the folder, why not) when it is
        taken (another process holds it, a new run finds a run there) or cannot be created."""
        run_dir = args.run_dir
        try:
            if run_dir is None:  # a new folder of its own, even for two runs started in the same second
                env = args.env.replace(":", "_").replace("/", "_")
                base = os.path.join("runs", f"{env}__{name}__{args.seed}__{int(time.time())}")
                os.makedirs("runs", exist_ok=True)
                run_dir = next(d for i in range(1000) if _created(d := base + (f"_{i}" if i else "")))
            label, folder = f"--run-dir {run_dir}", os.path.abspath(run_dir)
            others = lambda: [n for n in os.listdir(folder) if n != LOCK_FILE] if os.path.isdir(folder) else []
            if not self.resume and others():  # a new run: refused before it creates anything there
                who = holder(folder)
                if who:
                    return run_dir, f"{label} is in use by {who}: wait for it to end, or pick another folder"
                return run_dir, f"{label} is not empty: continue it with --resume, or pick a new folder"
            os.makedirs(folder, exist_ok=True)
            fd = lock_folder(folder, self.script, label)
            self._unlock = weakref.finalize(self, os.close, fd)  # at close(), or when the Run is dropped
            if not self.resume and others():  # a run that took the folder and ended since
                self._unlock()
                return run_dir, f"{label} is not empty: continue it with --resume, or pick a new folder"
        except RunError as e:
            return run_dir, str(e)
        except OSError as e:
            return run_dir, f"--run-dir {run_dir}: cannot create the run folder ({_reason(e)}): pick a writable folder"
        return run_dir, None

    def _open(self, args: RunArgs, name: str, keep: int) -> None:
        """The folder taken: args.json (a new run), wandb, the checkpoint manager, the signal handlers."""
        os.makedirs(self.dir, exist_ok=True)  # by every process (process 0 created it)
        if self.is_main and not self.resume:
            text = json.dumps({**dataclasses.asdict(args), "_script": self.script}, indent=2, default=str)
            atomic_write(os.path.join(self.dir, "args.json"), text.encode())
        self._metrics = None  # opened at the first log (after `restore` truncated it)
        self._wandb = None
        if args.track and self.is_main:
            try:
                import wandb
            except ImportError as e:
                raise RunError("--track needs wandb: pip install wandb") from e
            self._wandb = wandb.init(
                project=args.wandb_project,
                name=os.path.basename(self.dir),
                group=name,
                dir=self.dir,
                config=dataclasses.asdict(args),
                resume="allow",
                id=os.path.basename(self.dir),
            )
        import orbax.checkpoint as ocp

        self._ocp = ocp
        # synchronous saves: a failure (a full disk) is raised here, not printed by a background thread
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False
        )
        self._mgr = ocp.CheckpointManager(os.path.join(self.dir, "checkpoints"), options=options)
        self.saved_step = self._mgr.latest_step()  # the last complete checkpoint
        if stale := sorted(self._mgr.all_steps())[:-keep]:  # a kill came between a save and orbax's pruning
            for old in stale:
                self._mgr.delete(old)
            self._prune_host(self.saved_step)
        self._t0 = time.time()
        self._signal: str | None = None  # the name of the signal that asked this process to stop
        self._handlers = {}
        with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._handlers[sig] = signal.signal(sig, self._on_signal)

    @property
    def resume_command(self) -> str:
        return f"python {self.script}.py --resume --run-dir {self.dir}"

    @property
    def stopping(self) -> str | None:
        """The signal that asked the run to stop at its next update boundary, or None; one host's stops them all."""
        if jax.process_count() == 1:
            return self._signal
        return (self._signal or "a signal to another host") if mesh.anywhere(self._signal is not None) else None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal = signal.Signals(signum).name
        for sig, handler in self._handlers.items():  # a second signal: what it did before this run
            signal.signal(sig, handler)
        print(f"\n{self._signal}: saving at the next update boundary, then stopping (again: stop now)", flush=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write namespaced scalar metrics (pull them from the device once, here)."""
        row = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        row = {"step": int(step), **row, "time/elapsed_s": time.time() - self._t0}
        if self.is_main:
            try:
                if self._metrics is None:
                    self._metrics = open(os.path.join(self.dir, "metrics.jsonl"), "a")
                self._metrics.write(json.dumps(row) + "\n")
                self._metrics.flush()
            except OSError as e:
                raise self._failed(
                    f"writing {self.dir}/metrics.jsonl failed ({e.strerror}); {self._last_good()}"
                ) from e
        if self._wandb:
            self._wandb.log(row, step=int(step))

    def log_videos(self, step: int, policy: str, videos: list[tuple[np.ndarray, bool, int]]) -> None:
        """Write an evaluated `policy`'s recorded episodes (`envs.EvalTrace.videos`) as MP4 under videos/, named by
        step, policy, episode and outcome (process 0: its envs'), and log them to wandb with --track."""
        if not videos or not self.is_main:
            return
        from common import video

        try:
            paths = video.write_videos(os.path.join(self.dir, "videos"), step, policy, videos)
        except OSError as e:
            raise self._failed(f"writing videos in {self.dir}/videos failed ({_reason(e)}); {self._last_good()}") from e
        if self._wandb:
            import wandb

            media = {f"videos/{policy}_ep{i}": wandb.Video(p, format="mp4") for i, p in enumerate(paths)}
            self._wandb.log(media, step=int(step))

    def report(self, step: int, metrics: dict, phase: str, total: int, start: tuple[int, float], show: tuple) -> None:
        """`log` the metrics with the phase's rate since `start` = (step, time) and print a progress line (process 0)
        with the ETA and the `show` metrics; a loss (losses/*) that is NaN or inf stops the run (RunError)."""
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        rate = (step - start[0]) / max(time.time() - start[1], 1e-9)
        metrics[f"time/{phase}_steps_per_s"] = rate
        self.log(step, metrics)
        bad = {k: v for k, v in metrics.items() if k.startswith("losses/") and not np.isfinite(v)}
        if bad:
            what = ", ".join(f"{k} = {v}" for k, v in bad.items())
            raise self._failed(
                f"{phase} step {step}: {what}, the run stopped; {self._last_good()}. Lower the learning "
                "rate or check the data, then start a new run (--pi0-checkpoint can start from it)"
            )
        if self.is_main:
            eta = (total - step) / max(rate, 1e-9)
            shown = "  ".join(f"{k.split('/')[-1]}={metrics[k]:.3g}" for k in show if k in metrics)
            print(f"[{phase}] step {step}/{total}  {rate:.1f} steps/s  ETA {eta / 60:.1f} min  {shown}", flush=True)

    def _failed(self, message: str) -> RunError:
        """The RunError that ends the run, after closing it (signal handlers given back, files closed)."""
        with contextlib.suppress(Exception):  # a folder that cannot be written may also fail to close
            self.close()
        return RunError(message)

    def _last_good(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is step {self.saved_step} in {self.dir}/checkpoints"

    def save(self, step: int, state: Any, extra: dict[str, Any], host: dict[str, Any] | None = None) -> None:
        """Checkpoint `step`: this process's `host` arrays, then the orbax `state` and JSON `extra` (at the step last
        saved: the host file only); NaN or inf is not saved (RunError); when `stopping`, exit with status 0."""
        ocp, new = self._ocp, step != self.saved_step
        if new and not _all_finite(state):
            raise self._failed(f"step {step}: the train state holds NaN or inf and was not saved; {self._last_good()}")
        try:
            need = (_nbytes(state) if new else 0) + (_nbytes(host) if host is not None else 0)
            if (free := shutil.disk_usage(self.dir).free) < 1.1 * need + 2**20:
                raise OSError(errno.ENOSPC, f"{need / 2**30:.2f} GiB to write, {free / 2**30:.2f} GiB free")
            if host is not None:
                atomic_write(self._file(f"host/{step}"), lambda f: np.savez(f, **_flatten(host)))
            if new:  # a failed write is reported below, once, not again by orbax's and tensorstore's threads
                restore = _quiet_stragglers()
                extra = {**extra, "_host": host is not None}
                extra = json.loads(json.dumps(extra, default=lambda x: np.asarray(x).tolist()))  # numpy, jax: lists
                items = dict(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra))
                self._mgr.save(step, args=ocp.args.Composite(**items), force=True)
                self._mgr.wait_until_finished()
                restore()
            self._prune_host(step)
        except Exception as e:  # a full disk, a folder gone: one line, the last good checkpoint
            raise self._failed(
                f"saving step {step} in {self.dir} failed ({_reason(e)}); {self._last_good()}: free "
                f"space or fix the folder, then {self.resume_command}"
            ) from e
        self.saved_step = step
        if stopping := self.stopping:
            self.close()
            print(f"{stopping}: saved step {step}, stopped. Resume with:\n  {self.resume_command}", flush=True)
            raise SystemExit(0)

    def kept(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays `keep` wrote under `name` in this run folder (this process's), or None before it did."""
        path = self._file(name)
        if not os.path.exists(path):
            return None
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def keep(self, name: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Write `arrays` once for the run (per process) and return them: a cache computed from a train state that
        moves on, for a resumed run to read back (`kept`) what the uninterrupted one used."""
        atomic_write(self._file(name), lambda f: np.savez(f, **arrays))
        return arrays

    def _file(self, name: str) -> str:
        """This process's file `name` in the run folder (each process writes its own)."""
        return os.path.join(self.dir, f"{name}.p{jax.process_index()}.npz")

    def _prune_host(self, step: int) -> None:
        """Drop this process's host files of steps orbax no longer keeps, and a killed write's temporary file."""
        keep, folder, mine = {*self._mgr.all_steps(), step}, os.path.join(self.dir, "host"), f".p{jax.process_index()}."
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if mine not in name:
                continue
            if ".tmp" in name or (name.split(".")[0].isdigit() and int(name.split(".")[0]) not in keep):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))

    def restore(self, target: Any) -> tuple[int, Any, dict[str, Any], dict[str, Any]] | None:
        """(step, state shaped like `target`, extra, host arrays or {}) of the last checkpoint when resuming, with
        metrics.jsonl truncated to that step; None for a new run or one that saved nothing yet."""
        if not self.resume:
            return None
        step, ocp = self._mgr.latest_step(), self._ocp
        self._truncate_metrics(-1 if step is None else step)
        if step is None:
            print(f"{self.dir}: no checkpoint yet, the run starts over")
            return None
        where = os.path.join(self.dir, "checkpoints", str(step))
        try:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
            items = dict(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore())
            out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise self._failed(
                f"{where} does not fit this script's train state ({_reason(e)}); was it written by another "
                "version of the script? Start a new run (--pi0-checkpoint can start from it)"
            ) from e
        host, file = {}, self._file(f"host/{step}")
        if out["extra"].get("_host"):  # this step was saved with host arrays: they must be there
            try:
                with np.load(file) as z:
                    host = _unflatten({k: z[k] for k in z.files})
            except Exception as e:
                earlier = [s for s in self._mgr.all_steps() if s < step]
                fix = "start a new run"
                if earlier:
                    fix = f"move {where} out of the run folder to resume from step {max(earlier)}"
                raise self._failed(
                    f"{file}: {_reason(e)}; the replay buffer and env state of step {step} are lost: {fix}"
                ) from e
        self.saved_step = step
        print(f"resumed {self.dir} at step {step}")
        return step, out["state"], out["extra"], host

    def _truncate_metrics(self, step: int) -> None:
        """Keep the rows of metrics.jsonl up to `step` (a kill can leave a partial last line: dropped)."""
        file = os.path.join(self.dir, "metrics.jsonl")
        if not self.is_main or not os.path.exists(file):
            return
        rows = []
        with open(file) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line)["step"] <= step:
                        rows.append(line if line.endswith("\n") else line + "\n")
        atomic_write(file, "".join(rows).encode())

    def close(self) -> None:
        for sig, handler in self._handlers.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, handler)
        self._handlers = {}
        self._mgr.wait_until_finished()
        self._mgr.close()
        if self._metrics:
            self._metrics.close()
            self._metrics = None
        if self._wandb:
            self._wandb.finish()
            self._wandb = None
        self._unlock()  # the folder's lock: the run is over


@contextlib.contextmanager
def one_line_errors():
    """For a script's `__main__`: a `RunError` prints its one line to stderr and exits with status 2; Ctrl-C before
    the run could save says so (status 130)."""
    try:
        yield
    except RunError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted before the run saved anything", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def _created(folder: str) -> bool:
    """Create `folder` (its parent exists); False when it exists: another run's, even one started this very moment."""
    try:
        os.mkdir(folder)
    except FileExistsError:
        return False
    return True


def atomic_write(path: str, data: bytes | typing.Callable[[typing.BinaryIO], Any]) -> None:
    """Write `data` (bytes, or a function writing to a binary file) to a temporary file, flush it to disk, then rename
    it over `path`: a reader sees the old file or the new one, never a part of one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data) if isinstance(data, bytes) else data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of arrays -> {"a/b/c": array}; an empty dict stays, as the key "a/b/"."""
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/") if v else {f"{prefix}{k}/": np.zeros(0)})
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        *path, last = key.split("/")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        if last:
            node[last] = v
    return out


def _reason(e: BaseException) -> str:
    """The root cause of an exception chain in a few words (an OSError's strerror, else type and first line)."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror}: {seen.filename}" if seen.filename else seen.strerror
        if code := re.search(r"os_error_code='?(\d+)", str(seen)):  # tensorstore's OS errors (orbax writes)
            return os.strerror(int(code.group(1)))
        seen = seen.__cause__ or seen.__context__
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def _nbytes(tree: Any) -> int:
    size = lambda x: int(np.prod(np.shape(x))) * np.dtype(getattr(x, "dtype", np.float64)).itemsize
    return sum(size(x) for x in jax.tree.leaves(tree))


def _quiet_stragglers() -> typing.Callable[[], None]:
    """While orbax writes: keep quiet what its and tensorstore's threads report again after a failed write (it would
    bury the one line that says what happened). Returns the function that undoes it."""
    hooks = sys.excepthook, threading.excepthook, sys.unraisablehook
    loggers = {name: logging.getLogger(name).level for name in ("absl", "asyncio")}
    filters = warnings.filters[:]
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)  # the writes a failure left
    echo = lambda v: not (isinstance(v, RuntimeError) and "Event loop is closed" in str(v))
    sys.excepthook = lambda k, v, tb: echo(v) and hooks[0](k, v, tb)
    threading.excepthook = lambda a: echo(a.exc_value) and hooks[1](a)
    sys.unraisablehook = lambda u: echo(u.exc_value) and hooks[2](u)
    for name in loggers:
        logging.getLogger(name).setLevel(logging.CRITICAL)

    def restore() -> None:
        sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
        warnings.filters[:] = filters
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)

    return restore


@jax.jit
def _finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(state: Any) -> bool:
    """Whether every floating-point leaf of `state` is finite (one jitted reduction)."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return bool(_finite(leaves)) if leaves else True


def check_choices(args: Any) -> None:
    """Raise RunError naming the flag when a field of the Args dataclass typed `Literal[...]` holds another value
    (tyro already refuses one on the command line; this also covers `main(Args(...))`)."""
    hints = typing.get_type_hints(type(args))
    for f in dataclasses.fields(args):
        hint, value = hints[f.name], getattr(args, f.name)
        if value is not None and type(None) in typing.get_args(hint):  # `Literal[...] | None` set to a value
            hint = next(h for h in typing.get_args(hint) if h is not type(None))
        choices = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Literal and value not in choices:
            raise RunError(f"--{f.name.replace('_', '-')} {value!r}: choose one of {choices}")


def check_at_least(args: Any, minimum: int, *names: str) -> None:
    """Raise RunError naming the flag when one of the numeric fields `names` of `args` is below `minimum`."""
    for name in names:
        if getattr(args, name) < minimum:
            raise RunError(f"--{name.replace('_', '-')} must be ≥ {minimum} (got {getattr(args, name)})")


def check_ema(decay: float, updates: int, what: str) -> None:
    """--ema-decay d: refused outside [0, 1) (0: no average); a warning when the run's `updates` averaged updates (named
    `what`) leave more than 5% of the starting weights in the average, d^updates: θ̄ lags θ by about 1/(1 − d) updates,
    and evaluations and the export use θ̄."""
    if not 0 <= decay < 1:
        raise RunError(f"--ema-decay must be in [0, 1): 0 turns the average off (got {decay})")
    if decay > 0 and updates > 0 and decay**updates > 0.05:
        print(
            f"warning: --ema-decay {decay} averages over about {1 / (1 - decay):,.0f} updates; "
            f"after {updates:,} {what} the average still holds {decay**updates:.0%} of the starting weights and lags "
            f"the trained ones: lower it (e.g. --ema-decay {max(0.0, 1 - 3 / updates):.4g}) or train longer"
        )


def check_ranges(args: Any, **ranges: tuple[float, float | None]) -> None:
    """Raise RunError naming the flag when a float field `name` of `args` is outside lo < value ≤ hi (hi None: no
    upper bound), e.g. `check_ranges(args, gamma=(0, 1), lr=(0, None))`."""
    for name, (lo, hi) in ranges.items():
        value = getattr(args, name)
        if not (lo < value and (hi is None or value <= hi)):
            bound = f"in ({lo}, {hi}]" if hi is not None else f"> {lo}"
            raise RunError(f"--{name.replace('_', '-')} must be {bound} (got {value})")


def crossed(prev: int, step: int, every: int, start: int = 0) -> bool:
    """Whether the steps (prev, step] passed `start` + a multiple of `every` (0: never): the cadence test."""
    return every > 0 and (step - start) // every > (prev - start) // every


@dataclasses.dataclass
class Policy:
    """π₀ as a run starts it: the model, its parameters, the plumbing between env and π₀ (`io`) and its norm stats."""

    model: pi0.Pi0
    params: pi0.Params
    io: pi0.EnvIO
    stats: dict[str, dict[str, np.ndarray]]

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps next to π₀'s parameters to be read the same way again: norm stats, prompt form."""
        c = self.model.config
        prompt = {"max_token_len": c.max_token_len, "discrete_state": c.state_in_prompt}
        return {"norm_stats": self.stats, "pi0": prompt}


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
    discrete_state: bool | None = None,
    precision: str | None = None,
    remat: str | None = None,
    resume_dir: str | None = None,
) -> Policy:
    """The π₀ a run starts from: `checkpoint` (`openpi.start_from`) or the `preset` sized to `env` with `data_stats`;
    chunks of `model_horizon` (0: `action_horizon`) of which `action_horizon` are executed; `resume_dir`'s stats win."""
    H_m = model_horizon or action_horizon
    delta = 0
    if checkpoint:
        from common import openpi

        params, cfg, stats, delta = openpi.start_from(checkpoint, env, env_name, preset, H_m, asset_id)
    else:
        if data_stats is None:
            raise RunError(
                f"--env {env_name}: pass --dataset ({DATASET_KINDS}; π₀ from scratch takes its norm stats "
                "from it) or --pi0-checkpoint"
            )
        params, stats = None, data_stats
        shape = dict(action_dim=env.action_dim, state_dim=env.state_dim, action_horizon=H_m)
        cfg = pi0.make_config(preset, cameras=tuple(env.camera_names), **shape)
    saved = latest_extra(resume_dir) if resume_dir else None
    if saved is not None:  # a resumed run's own norm stats
        stats = {k: {s: np.asarray(x, np.float32) for s, x in v.items()} for k, v in saved["norm_stats"].items()}
    if discrete_state is not None:
        if not cfg.pi05:
            raise RunError(
                f"--discrete-state {discrete_state}: only π₀.₅ reads its state as text in the prompt; this π₀ reads it "
                "through its state token: leave the flag out (or use a π₀.₅: --pi0-preset pi05 / a pi05 checkpoint)"
            )
        cfg = dataclasses.replace(cfg, discrete_state=discrete_state)
    cfg = dataclasses.replace(cfg, **pi0.train_precision(cfg, precision, remat))
    if cfg.pi05:
        how = "written into the prompt (256 bins, assembled in jit)" if cfg.state_in_prompt else "not in the prompt"
        print(f"π₀.₅: the state is {how}; prompts of {cfg.max_token_len} tokens (--discrete-state to change)")
    table = pi0.make_prompt_table(prompts, pi0.make_tokenizer(tokenizer, cfg), cfg.state_in_prompt)
    io = pi0.EnvIO(cfg, table, stats, env.action_dim, delta, quantile=cfg.pi05, horizon=action_horizon)
    model = pi0.Pi0(cfg)
    return Policy(model, model.init(rng) if params is None else params, io, stats)


def latest_extra(run_dir: str) -> dict[str, Any] | None:
    """The JSON `extra` (norm stats, counters) of a run folder's last checkpoint, None if it has none."""
    import orbax.checkpoint as ocp

    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return None
    with ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(create=False)) as mgr:
        step = mgr.latest_step()
        return (
            None if step is None else mgr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
        )
