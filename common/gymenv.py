"""Gymnasium environments: any registered id (or "module:EnvId") with Box state observations and Box actions, its
sub-envs in worker processes (`common.workers`); the readers of OGBench/D4RL npz files and Minari datasets; and
OGBench's scripted oracles writing datasets in OGBench's npz layout (`python -m common make-dataset --env
ogbench:<id>`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from common import RunError
from common.workers import Pool, WorkerError

if TYPE_CHECKING:
    from common.data import EpisodeData

Obs = dict[str, Any]
# what gymnasium.make raises for an id that is not registered
UNKNOWN = ("NameNotFound", "NamespaceNotFound", "VersionNotFound", "Error", "ModuleNotFoundError", "DeprecatedEnv")
UNKNOWN += ("UnregisteredEnv",)


def _rss_mb() -> float:
    """This process's resident memory in MB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def available_mb() -> float:
    """MemAvailable of this machine in MB (Linux; inf elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return float("inf")


class _Envs:
    """`count` gymnasium envs in one process: what a worker (or `GymVecEnv` with workers=0) holds."""

    def __init__(self, env_id: str, count: int, make_kwargs: dict[str, Any]):
        base = _rss_mb()
        self.envs = [gym.make(env_id, **make_kwargs)]  # "module:EnvId" imports module first (ogbench:cube-single-v0)
        one = _rss_mb()
        self.envs += [gym.make(env_id, **make_kwargs) for _ in range(count - 1)]
        per_env = (_rss_mb() - one) / (count - 1) if count > 1 else one - base
        env = self.envs[0]
        spec = env.spec.max_episode_steps if env.spec else None
        self.info = dict(
            obs_space=env.observation_space,
            act_space=env.action_space,
            max_episode_steps=spec,
            rss_mb=_rss_mb(),
            per_env_mb=per_env,
        )

    def reset(self, idx: list[int], seeds: list[int | None]) -> np.ndarray:
        obs = [self.envs[i].reset(seed=s)[0] for i, s in zip(idx, seeds, strict=True)]
        return np.stack([np.asarray(o, np.float32).reshape(-1) for o in obs])

    def step(self, idx: list[int], actions: np.ndarray) -> tuple[np.ndarray, ...]:
        out = []
        for i, a in zip(idx, actions, strict=True):
            obs, r, te, tr, info = self.envs[i].step(a.reshape(self.envs[i].action_space.shape))
            ok = bool(info.get("success", info.get("is_success", False)))
            out.append((np.asarray(obs, np.float32).reshape(-1), float(r), bool(te), bool(tr), ok))
        return tuple(np.array(x) for x in zip(*out, strict=True))

    def render(self, idx: list[int], largest: list[int]) -> np.ndarray:
        """`render()` of envs `idx` (made with render_mode="rgb_array"), every k-th pixel: sides ≤ `largest`."""
        frames = [self.envs[i].render() for i in idx]
        if frames[0] is None:
            raise RunError("the env renders nothing: make it with render_mode='rgb_array'")
        k = -(-max(frames[0].shape[:2]) // int(largest[0]))
        return np.stack([np.asarray(f, np.uint8)[::k, ::k, :3] for f in frames])

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _unknown(env_id: str, why: str) -> RunError:
    return RunError(
        f"unknown environment {env_id!r} ({why}). Use 'push', 'libero', 'ogbench:<id>', or any gymnasium id registered "
        "in this Python (e.g. 'Pendulum-v1', or 'my_module:MyEnv-v0' to import my_module first)."
    )


def check_env(env_id: str) -> None:
    """Refuse, before any work, an id gymnasium cannot make or an env whose spaces the scripts cannot use: one env
    made in this process and closed. An env that needs keyword arguments is left to `GymVecEnv` to check."""
    try:
        env = gym.make(env_id)
    except TypeError:
        return
    except Exception as e:  # gymnasium's registration errors, or the module of 'module:EnvId' missing
        if type(e).__name__ in UNKNOWN:
            raise _unknown(env_id, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
        raise RunError(f"{env_id}: gymnasium.make raised {type(e).__name__}: {e}") from None
    try:
        GymVecEnv._check_spaces(env_id, env.observation_space, env.action_space)
    finally:
        env.close()


class GymVecEnv:
    """`num_envs` copies of a gymnasium env, state-only, with `common.envs`'s interface (`active` masks,
    `reset_where`, no autoreset), spread over `workers` processes (default: one per CPU core, at most one per env; 0:
    all in this process). Env i is first reset with seed `seed + first + i` (`first`: env 0's index in the run).
    `make_kwargs` go to `gymnasium.make`; `prompt` is the instruction every observation carries (prompt id 0).
    Success is `info["success"]`, else `info["is_success"]`. Refuses (RunError) a count that would not fit in the
    available memory, measured on the first worker's envs, and prints the memory the envs take.
    """

    def __init__(
        self,
        env_id: str,
        num_envs: int,
        seed: int = 0,
        first: int = 0,
        workers: int | None = None,
        prompt: str = "",
        **make_kwargs: Any,
    ):
        workers = min(num_envs, os.cpu_count() or 1) if workers is None else min(workers, num_envs)
        if make_kwargs.get("render_mode") and not os.environ.get("MUJOCO_GL"):  # MuJoCo envs (OGBench) render offscreen
            from common.libero import setup_rendering

            with contextlib.suppress(ImportError):  # no offscreen OpenGL: envs that draw without it still render
                setup_rendering()  # MUJOCO_GL for this process and the workers it starts
        self.env_id, self.num_envs, self.seed, self.first, self.prompt = env_id, num_envs, seed, first, prompt
        counts = [len(r) for r in np.array_split(np.arange(num_envs), max(workers, 1))]
        self._where = [(w, i) for w, c in enumerate(counts) for i in range(c)]  # env -> (worker, index there)
        self._pool = Pool("common.gymenv:_Envs", "gymnasium", processes=workers > 0)
        try:
            self._start(env_id, counts, workers, make_kwargs)
        except BaseException:
            self.close()
            raise
        self._state = np.zeros((num_envs, self.state_dim), np.float32)
        self._seeded = False

    def _start(self, env_id: str, counts: list[int], workers: int, make_kwargs: dict[str, Any]) -> None:
        start = time.time()
        make = [dict(env_id=env_id, count=c, make_kwargs=make_kwargs) for c in counts]
        with self._errors(make_kwargs):
            (info,) = self._pool.start(make[:1])
        self._check_spaces(env_id, info["obs_space"], info["act_space"])
        need = info["per_env_mb"] * (self.num_envs - counts[0]) + (info["rss_mb"] - info["per_env_mb"] * counts[0]) * (
            len(counts) - 1
        )
        if workers and need > 0.9 * available_mb():
            fit = max(1, int(0.9 * available_mb() / max(info["per_env_mb"], 1.0)))
            raise RunError(
                f"{env_id}: {self.num_envs} envs need ~{(need + info['rss_mb']) / 1024:.1f} GB "
                f"(~{info['per_env_mb']:.0f} MB each), {available_mb() / 1024:.1f} GB is available: "
                f"pass --num-envs (and --eval-envs) ≤ {fit}"
            )
        with self._errors(make_kwargs):
            rss = info["rss_mb"] + sum(i["rss_mb"] for i in self._pool.start(make[1:]))
        where = f"in {workers} worker processes" if workers else "in this process"
        print(
            f"{env_id}: {self.num_envs} envs {where}, ~{info['per_env_mb']:.0f} MB per env, {rss / 1024:.2f} GB "
            f"in all ({time.time() - start:.1f}s)",
            flush=True,
        )
        obs_space, act_space = info["obs_space"], info["act_space"]
        self.state_dim, self.action_dim = int(np.prod(obs_space.shape)), int(np.prod(act_space.shape))
        self.prompts, self.camera_names = [self.prompt], []
        self.action_low = np.broadcast_to(act_space.low, act_space.shape).reshape(-1).astype(np.float32)
        self.action_high = np.broadcast_to(act_space.high, act_space.shape).reshape(-1).astype(np.float32)
        self.max_episode_steps = info["max_episode_steps"]

    @contextlib.contextmanager
    def _errors(self, make_kwargs: dict[str, Any]):
        """An exception of the envs as a RunError that says what to do."""
        try:
            yield
        except WorkerError as e:
            if e.kind == "TypeError" and make_kwargs:  # a keyword the env does not take
                raise RunError(
                    f"--env-kwargs {make_kwargs}: gymnasium.make({self.env_id!r}, ...) refused them ({e.message})"
                ) from None
            if e.kind in UNKNOWN:
                raise _unknown(self.env_id, e.message) from None
            raise RunError(f"{self.env_id}: the env raised {e}") from None

    @staticmethod
    def _check_spaces(env_id: str, obs_space: gym.Space, act_space: gym.Space) -> None:
        if not isinstance(obs_space, gym.spaces.Box):
            raise RunError(
                f"{env_id!r} has observation space {obs_space}; only Box observations are supported. Wrap the env "
                "(e.g. gymnasium.wrappers.FlattenObservation) and register the wrapped env under a new id."
            )
        if obs_space.dtype == np.uint8 and len(obs_space.shape) == 3:
            raise RunError(
                f"{env_id!r} observes images {obs_space.shape}; the gymnasium path is state-only (pixels are not a "
                "state vector). Use the env's state version (OGBench: cube-single-... for visual-cube-single-...)."
            )
        if not isinstance(act_space, gym.spaces.Box):
            raise RunError(
                f"{env_id!r} has action space {act_space}; only continuous Box actions are supported (action chunks "
                "are float vectors). Pick a continuous-control env."
            )

    def _call(self, cmd: str, envs: np.ndarray, arrays: list[np.ndarray]) -> list[tuple[np.ndarray, Any]]:
        """`cmd` on every worker holding one of `envs`, with its rows of `arrays`: [(those envs, the reply)]."""
        jobs, mine = {}, {}
        for w in range(len(self._pool.workers)):
            if here := [int(e) for e in envs if self._where[e][0] == w]:
                jobs[w] = ([self._where[e][1] for e in here], *([a[e] for e in here] for a in arrays))
                mine[w] = np.array(here)
        with self._errors({}):
            return [(mine[w], reply) for w, reply in self._pool.call(cmd, jobs).items()]

    def reset(self, seed: int | None = None) -> tuple[Obs, dict]:
        """Reset all envs; the first reset (or one with `seed`) seeds env i with `seed + first + i`."""
        if seed is not None:
            self.seed, self._seeded = seed, False
        return self.reset_where(np.ones(self.num_envs, bool)), {}

    def reset_where(self, mask: np.ndarray) -> Obs:
        """Reset the envs where `mask` is True; returns the observation of all envs."""
        idx = np.flatnonzero(mask)
        seeds = [None if self._seeded else self.seed + self.first + int(i) for i in range(self.num_envs)]
        for mine, obs in self._call("reset", idx, [seeds]):
            self._state[mine] = obs
        self._seeded = self._seeded or bool(np.all(mask))
        return self._obs()

    def step(self, actions: np.ndarray, active: np.ndarray | None = None) -> tuple:
        """Step the envs where `active` (default all) with actions [E, A], clipped to the action bounds."""
        e = self.num_envs
        act = np.ones(e, bool) if active is None else np.asarray(active, bool)
        actions = np.clip(np.asarray(actions, np.float32).reshape(e, -1), self.action_low, self.action_high)
        reward, term, trunc, success = np.zeros(e, np.float32), np.zeros(e, bool), np.zeros(e, bool), np.zeros(e, bool)
        for mine, (obs, r, te, tr, ok) in self._call("step", np.flatnonzero(act), [actions]):
            self._state[mine], reward[mine], term[mine], trunc[mine], success[mine] = obs, r, te, tr & ~te, ok
        info = {"success": success, "subgoal": np.zeros(e, bool)}
        return self._obs(), reward, term, trunc, info

    def render_frames(self, idx: np.ndarray, largest: int = 256) -> np.ndarray:
        """Video frames uint8 [n, h, w, 3] of envs `idx`, each env's `render()` (the envs made with
        render_mode="rgb_array") at every k-th pixel, so that h, w ≤ `largest`; only those envs render."""
        frames = {}
        for mine, reply in self._call("render", np.asarray(idx), [np.full(self.num_envs, largest)]):
            frames.update(zip(mine.tolist(), reply, strict=True))
        return np.stack([frames[int(e)] for e in idx])

    def _obs(self) -> Obs:
        return {"state": self._state.copy(), "prompt_id": np.zeros(self.num_envs, np.int32), "images": {}}

    def close(self) -> None:
        self._pool.close()


# ----------------------------------------------------------------------------------------------------- datasets
def _episodes(
    path: str | os.PathLike,
    state: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    terminal: np.ndarray,
    ends: np.ndarray,
    prompts: list[str],
) -> EpisodeData:
    """`EpisodeData` from frame arrays: `ends` marks each trajectory's last frame, `terminal` a true termination
    (the trajectory is cut there: the frames after it start a new episode, as the env would reset)."""
    from common.data import DatasetError, EpisodeData, refuse_non_finite  # here: workers import gymenv without h5py

    n = len(actions)
    if not (len(state) == n == len(rewards) == len(terminal) == len(ends)):
        raise DatasetError(f"{path}: observations, actions, rewards and terminals differ in length")
    if state.ndim != 2:
        raise DatasetError(
            f"{path}: observations have shape {state.shape}; only state vectors [N, S] are read "
            "(pixel datasets, e.g. OGBench's visual-*, are not)"
        )
    ends = ends.astype(bool).copy()
    ends[-1] = True  # a file cut short still ends its last trajectory
    cut = ends | terminal
    stops = np.flatnonzero(cut) + 1
    starts = np.concatenate([[0], stops[:-1]]).astype(np.int64)
    lengths = (stops - starts).astype(np.int64)
    obs = {"state": state.astype(np.float32), "prompt_id": np.zeros(n, np.int32), "images": {}}
    subgoal = np.zeros(n, bool)
    truncated = ~terminal[stops - 1]
    actions, rewards = actions.astype(np.float32), rewards.astype(np.float32)
    data = EpisodeData(obs, actions, rewards, terminal.astype(bool), subgoal, starts, lengths, truncated, list(prompts))
    refuse_non_finite(path, data)
    return data


def load_npz(path: str | os.PathLike, env_id: str, prompts: list[str]) -> EpisodeData:
    """Episodes of an npz file in OGBench's layout (`observations`, `actions`, `terminals` ending each trajectory,
    `qpos` / `qvel` / `button_states`). Without `rewards`, an OGBench single-task env's are relabelled from `qpos`
    (`_ogbench_rewards`); with them (and `masks`, or D4RL's `timeouts`) the file is read as given."""
    from common.data import DatasetError

    try:
        f = np.load(path, allow_pickle=False)
        data = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"{path}: not a readable npz file ({e})") from None
    missing = [k for k in ("observations", "actions", "terminals") if k not in data]
    if missing:
        raise DatasetError(
            f"{path}: no {', '.join(missing)} (found {', '.join(sorted(data))}); expected OGBench's npz layout: "
            "observations, actions, terminals [, qpos, qvel, rewards]"
        )
    ends = data["terminals"].astype(bool)
    if "rewards" not in data:
        rewards, terminal = _ogbench_rewards(path, env_id, data)
    elif "timeouts" in data:  # D4RL's layout: terminals are true terminations, timeouts the time limits
        rewards, terminal, ends = data["rewards"], ends, ends | data["timeouts"].astype(bool)
    else:  # OGBench's layout with rewards: a true termination where masks == 0 (or dones)
        rewards = data["rewards"]
        terminal = (data["masks"] == 0) if "masks" in data else data.get("dones", np.zeros(len(rewards), bool))
    return _episodes(path, data["observations"], data["actions"], rewards, np.asarray(terminal, bool), ends, prompts)


def ogbench_task(env_id: str) -> str | None:
    """The OGBench single-task id inside `env_id` ("ogbench:cube-single-singletask-task1-v0" -> its id), else None."""
    name = env_id.split(":", 1)[-1]
    return name if re.fullmatch(r"[a-z0-9-]+-singletask(-task\d+)?-v\d+", name) else None


def _ogbench_rewards(path: str | os.PathLike, env_id: str, data: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """OGBench's single-task rewards (−1 per unmet sub-goal, 0 at success, scored on the state before the action)
    and terminations at success, relabelled from `qpos` by OGBench's `relabel_dataset` as `make_env_and_datasets`."""
    from common.data import DatasetError

    task = ogbench_task(env_id)
    if task is None:
        raise DatasetError(
            f"{path}: no 'rewards' in the file, and --env {env_id} is not an OGBench single-task "
            "env to relabel them for (e.g. ogbench:cube-single-singletask-task1-v0); add a "
            "'rewards' array (and 'masks') to the file"
        )
    if "qpos" not in data:
        raise DatasetError(
            f"{path}: no 'qpos' to relabel OGBench rewards from; write the file with "
            "OGBench's generator or `python -m common make-dataset`"
        )
    import gymnasium as gym
    from ogbench.relabel_utils import relabel_dataset

    env = gym.make(f"ogbench:{task}")
    try:
        labels = {k: data[k] for k in ("qpos", "qvel", "button_states") if k in data}
        relabel_dataset(task, env, labels)
    finally:
        env.close()
    return labels["rewards"], labels["masks"] == 0


def load_minari(path: str | os.PathLike, prompts: list[str]) -> EpisodeData:
    """Episodes of a Minari dataset folder, Box observations only (each episode's extra last frame dropped)."""
    from common.data import DatasetError

    try:
        import minari
    except ModuleNotFoundError:
        raise DatasetError(f"{path}: a Minari dataset needs `pip install 'minari[hdf5]'`") from None
    import gymnasium as gym

    p = Path(path)
    ds = minari.MinariDataset(p / "data" if (p / "data").is_dir() else p)
    if not isinstance(ds.observation_space, gym.spaces.Box):
        raise DatasetError(
            f"{path}: observation space {ds.observation_space}; only Box observations are read "
            "(flatten Dict observations into one vector when writing the dataset)"
        )
    eps = list(ds.iterate_episodes())
    if not eps:
        raise DatasetError(f"{path}: the Minari dataset holds no episodes")
    state = np.concatenate(
        [np.asarray(e.observations, np.float32)[: len(e.actions)].reshape(len(e.actions), -1) for e in eps]
    )
    actions = np.concatenate([np.asarray(e.actions, np.float32).reshape(len(e.actions), -1) for e in eps])
    rewards = np.concatenate([np.asarray(e.rewards, np.float32) for e in eps])
    terminal = np.concatenate([np.asarray(e.terminations, bool) for e in eps])
    ends = np.concatenate([np.arange(len(e.actions)) == len(e.actions) - 1 for e in eps])
    return _episodes(path, state, actions, rewards, terminal, ends, prompts)


def dataset_prompt(path: str) -> str:
    """The instruction a gymnasium env sends with every observation: its dataset's (HDF5 attrs, LeRobot's
    `meta/tasks.jsonl`; "" for npz and Minari data); RunError for a dataset of several."""
    import h5py

    from common import data

    p = Path(path)
    found: set[str] = set()
    if data.is_lerobot(p):
        from common import openpi

        found = set(openpi.lerobot_tasks(p / "meta" / "tasks.jsonl").values())
    else:
        for file in data.hdf5_files(p):
            if not file.is_file() or not h5py.is_hdf5(file):
                continue
            with h5py.File(file, "r") as f:
                info = json.loads(f["data"].attrs.get("problem_info", "{}") or "{}") if "data" in f else {}
                found |= {data.demo_instruction(demo, info) for demo in f.get("data", {}).values()}
    found = sorted(found - {""})
    if len(found) > 1:
        raise RunError(
            f"--dataset {path} holds {len(found)} instructions ({'; '.join(found[:3])}...); a "
            "gymnasium env sends one: pass --env-kwargs prompt '<its instruction>'"
        )
    return found[0] if found else ""


# ----------------------------------------------------------------------------------------------------- OGBench oracle
OGBENCH_RECIPES = ("task", "noisy", "play")
_P_STACK = {
    "single": (0.0, 0.0),
    "double": (0.0, 0.25),
    "triple": (0.05, 0.35),
    "quadruple": (0.1, 0.5),
    "octuple": (0.0, 0.35),
}  # (OGBench's generator: stacking probability per cube count)


def make_ogbench_dataset(
    out: str | os.PathLike,
    env_id: str,
    episodes: int,
    noise: float = 0.1,
    recipe: str = "task",
    seed: int = 0,
    p_random: float | None = None,
    episode_steps: int = 1001,
) -> dict[str, Any]:
    """Roll out OGBench's scripted oracles and write OGBench's npz layout to `out` (atomically); returns stats
    (`success_rate`: of the task's episodes, recipe "task" only).

    recipe "task": the single-task env `env_id` itself (task mode: its time limit, termination at success), its cube
    oracle (`CubeMarkovOracle`) aimed at the task's goal, one cube after another; cube tasks only. "noisy" and "play"
    are OGBench's own dataset recipes on the env's data-collection mode, `episode_steps` steps an episode with a new
    random sub-task whenever the oracle finishes one (the data OGBench ships and Q-chunking trains on; the rewards of
    `env_id`'s task are relabelled when the file is read): "noisy" is the Markov oracles with Gaussian action noise of
    std ξ·(1, 1, 1, 3, 10), ξ ~ U(0, `noise`) per episode, and a uniform random action with probability `p_random`
    (default 0.1); "play" the plan oracles with smoothed noise `noise` (p_random default 0).
    """
    import ogbench  # noqa: F401  (registers the ids)
    from ogbench.manipspace.oracles.markov import button_markov, cube_markov, drawer_markov, window_markov
    from ogbench.manipspace.oracles.plan import button_plan, cube_plan, drawer_plan, window_plan

    if recipe not in OGBENCH_RECIPES:
        raise RunError(f"--recipe {recipe}: one of {', '.join(OGBENCH_RECIPES)}")
    task = ogbench_task(env_id)
    name = (task or env_id.split(":", 1)[-1]).split(":", 1)[-1]
    family = name.split("-")[0]
    if family not in ("cube", "scene", "puzzle") or (recipe == "task" and (task is None or family != "cube")):
        raise RunError(
            f"--env {env_id}: recipe {recipe!r} needs an OGBench "
            f"{'cube single-task' if recipe == 'task' else 'manipulation (cube, scene, puzzle)'} env, "
            "e.g. ogbench:cube-single-singletask-task1-v0"
        )
    p_random = (0.1 if recipe != "play" else 0.0) if p_random is None else p_random
    np.random.seed(seed)  # the oracles draw from numpy's global generator
    rng = np.random.default_rng(seed)
    if recipe == "task":
        env = gym.make(task)
    else:
        base = re.sub(r"-singletask(-task\d+)?", "", name)
        env = gym.make(base, terminate_at_goal=False, mode="data_collection", max_episode_steps=episode_steps)
    if recipe == "play":
        kw = dict(env=env, noise=noise, noise_smoothing=0.5)
        gripper = dict(gripper_always_closed=True) if family == "puzzle" else {}
        agents = {
            "cube": cube_plan.CubePlanOracle(**kw),
            "button": button_plan.ButtonPlanOracle(**kw, **gripper),
            "drawer": drawer_plan.DrawerPlanOracle(**kw),
            "window": window_plan.WindowPlanOracle(**kw),
        }
    else:
        kw = dict(env=env, min_norm=0.4)
        gripper = dict(gripper_always_closed=True) if family == "puzzle" else {}
        agents = {
            "cube": cube_markov.CubeMarkovOracle(**kw, max_step=100 if family == "scene" else 200),
            "button": button_markov.ButtonMarkovOracle(**kw, **gripper),
            "drawer": drawer_markov.DrawerMarkovOracle(**kw),
            "window": window_markov.WindowMarkovOracle(**kw),
        }
    cubes = next((v for k, v in _P_STACK.items() if f"-{k}" in name), (0.5, 0.5))
    frames: dict[str, list] = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
    buttons = hasattr(env.unwrapped, "_cur_button_states")
    if buttons:
        frames["button_states"] = []
    successes, start = 0, time.time()
    for ep in range(episodes):
        while True:  # OGBench's generator retries an unhealthy scene episode (the cube out of sight)
            ob, info = env.reset(seed=seed + ep if ep == 0 else None)
            p_stack = rng.uniform(*cubes)
            xi = rng.uniform(0, noise)
            info = _task_target(env, info) if recipe == "task" else info
            agent = agents[info["privileged/target_task"]]
            agent.reset(ob, info)
            episode: dict[str, list] = {k: [] for k in frames}
            done, success = False, False
            while not done:
                if rng.uniform() < p_random:  # from `rng`: OGBench's action space is a new (unseeded) Box each time
                    action = rng.uniform(env.action_space.low, env.action_space.high)
                else:
                    action = np.array(agent.select_action(ob, info))
                    if recipe != "play":
                        action = action + rng.normal(0, [xi, xi, xi, xi * 3, xi * 10], action.shape)
                action = np.clip(action, -1, 1)
                next_ob, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
                success |= bool(info.get("success", False)) or bool(terminated)
                if recipe == "task":
                    info = _task_target(env, info)
                    if agent.done or info["privileged/target_block"] != getattr(agent, "_block", None):
                        agent.reset(next_ob, info)
                        agent._block = info["privileged/target_block"]
                elif agent.done:
                    agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
                    agent = agents[agent_info["privileged/target_task"]]
                    agent.reset(agent_ob, agent_info)
                for k, v in (
                    ("observations", ob),
                    ("actions", action),
                    ("terminals", done),
                    ("qpos", info["prev_qpos"]),
                    ("qvel", info["prev_qvel"]),
                ):
                    episode[k].append(v)
                if buttons:
                    episode["button_states"].append(info["prev_button_states"])
                ob = next_ob
            xyz = np.array(episode["qpos"])[:, 14:17]
            healthy = family != "scene" or not (
                (xyz[:, 1] >= 0.29).any() or ((xyz[:, 1] <= -0.3) & ((xyz[:, 2] < 0.06) | (xyz[:, 2] > 0.08))).any()
            )
            if healthy:
                break
        for k in frames:
            frames[k] += episode[k]
        successes += success
        if (ep + 1) % max(1, episodes // 10) == 0 or ep + 1 == episodes:
            rate = (ep + 1) / (time.time() - start)
            print(f"  {ep + 1}/{episodes} episodes, {rate:.1f}/s, ETA {(episodes - ep - 1) / rate:.0f}s", flush=True)
    env.close()
    dtypes = dict(terminals=bool, button_states=np.int64)
    arrays = {k: np.asarray(v, dtypes.get(k, np.float32)) for k, v in frames.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out)  # atomic: a crash never leaves a half-written file under the name
    rate = successes / episodes if recipe == "task" else None  # play/noisy: sub-tasks, not the task
    return dict(episodes=episodes, frames=len(arrays["actions"]), success_rate=rate)


def add_ogbench_flags(parser: Any) -> None:
    """The flags of OGBench's recipes in `python -m common make-dataset`."""
    recipe_help = "OGBench: task (the single-task env, oracle aimed at its goal; cube tasks), or OGBench's own noisy / "
    recipe_help += "play data-collection recipes (episodes of --episode-steps)"
    parser.add_argument("--recipe", default="task", choices=OGBENCH_RECIPES, help=recipe_help)
    parser.add_argument("--p-random", type=float, default=None, help="OGBench: random-action probability (recipe's)")
    parser.add_argument("--episode-steps", type=int, default=1001, help="OGBench noisy/play: steps an episode")


def write_ogbench_dataset(args: Any, noise: float | str) -> None:
    """`python -m common make-dataset --env ogbench:<id>`: the oracle's episodes written to `args.out` (npz)."""
    start = time.time()
    if args.episode_steps < 1:
        raise SystemExit(f"--episode-steps {args.episode_steps}: out of range (≥ 1)")
    if args.p_random is not None and not 0 <= args.p_random <= 1:
        raise SystemExit(f"--p-random {args.p_random}: out of range ([0, 1])")
    if not args.out.endswith(".npz"):
        raise SystemExit(f"--out {args.out}: OGBench datasets are written in OGBench's npz layout; name it .npz")
    if os.path.exists(args.out):
        raise SystemExit(f"--out {args.out} exists; pick a new name (nothing on disk is overwritten)")
    try:
        if noise == "mixed":
            raise RunError("--noise mixed is push's; OGBench's recipes take one noise level")
        how = (args.recipe, args.seed, args.p_random, args.episode_steps)
        stats = make_ogbench_dataset(args.out, args.env, args.episodes, noise, *how)
    except RunError as e:
        raise SystemExit(str(e)) from None
    reached = ""
    if ogbench_task(args.env):  # the task's own success, from the relabelled rewards
        reached = f", {load_npz(args.out, args.env, ['']).terminals.sum()} frames at the task's goal"
    oracle = "" if stats["success_rate"] is None else f", oracle success {stats['success_rate']:.1%}"
    print(f"{args.episodes} episodes, {stats['frames']} steps{oracle}{reached}, {time.time() - start:.1f}s")
    print(f"-> {args.out}")


def _task_target(env: gym.Env, info: dict[str, Any]) -> dict[str, Any]:
    """`info` with the target keys OGBench's cube oracle reads in data-collection mode, for a task-mode cube env: the
    first cube not yet within 4 cm of its goal (all done: the last), its goal position, its own yaw."""
    u = env.unwrapped
    for i in range(u._num_cubes):
        goal = u._data.mocap_pos[u._cube_target_mocap_ids[i]].copy()
        if np.linalg.norm(u._data.joint(f"object_joint_{i}").qpos[:3] - goal) > 0.04:
            break
    target = {
        "privileged/target_task": "cube",
        "privileged/target_block": i,
        "privileged/target_block_pos": goal,
        "privileged/target_block_yaw": info[f"privileged/block_{i}_yaw"],
    }
    return dict(info, **target)
