"""Environments: the embedded `push` task, its demonstrator and datasets, which env a run uses (`EnvSpec`), open-loop
execution of action chunks, and evaluation.

Every env is vectorised over E copies, with `num_envs, action_dim, state_dim, prompts, camera_names, action_low,
action_high`, `reset(seed) -> (obs, info)`, `step(actions, active)`, `reset_where(mask) -> obs`, `close()`, and

    obs = {"state": float32[E, S], "prompt_id": int32[E], "images": {camera: uint8[E, h, w, 3]}}

(`prompt_id` indexes `env.prompts`), actions float32 [E, A] in the env's units. `step` never autoresets; it advances
only the envs where `active` (the others report reward 0, no termination or truncation), so an env whose episode
ended inside a chunk is never stepped again. `info` holds bool[E] `success` and `subgoal`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import jax
import numpy as np

from common import RunError, mesh

Obs = dict[str, Any]

PUSH_PROMPTS = [
    "push the block to the red target",
    "push the block to the green target",
    "push the block to the blue target",
]
PUSH_CAMERA = "base_0_rgb"
PUSH_COLOURS = [(220, 40, 40), (40, 170, 40), (40, 80, 230)]  # the targets, in the prompts' order
MIXED_NOISES = (0.3, 0.6, 1.0)


def _select(mask: np.ndarray, new: Any, old: Any) -> Any:
    """`new` where mask[e] else `old`, recursively over obs dicts (mask over the leading env axis)."""
    if isinstance(new, dict):
        return {k: _select(mask, new[k], old[k]) for k in new}
    m = mask.reshape(mask.shape + (1,) * (np.ndim(new) - 1))
    return np.where(m, new, old)


def _copy_obs(obs: Obs) -> Obs:
    return {k: _copy_obs(v) if isinstance(v, dict) else np.array(v, copy=True) for k, v in obs.items()}


# ----------------------------------------------------------------------------------------------------- push task
class PushEnv:
    """The embedded `push` task, vectorised in numpy.

    A disc agent moves in [-1, 1]² with velocity `speed * clip(action, -1, 1)` and pushes a round block kinematically
    (an overlapping block moves out along the contact normal; a block held by a wall stops the agent). Three targets
    (red, green, blue) sit 120° apart on a circle at a random rotation; the prompt names one. Reward 1 and termination
    when the block is within `success_radius` of it; truncation after `max_episode_steps`. State (10): agent xy,
    block xy, red xy, green xy, blue xy.

    New episodes come from one generator seeded `seed` (`first` None: the datasets), or env i's own seeded
    (seed, first + i): a run's env plays the same episodes however the envs are split over processes.
    """

    agent_radius = 0.05
    block_radius = 0.08
    target_radius = 0.65
    success_radius = 0.12
    speed = 0.065

    def __init__(
        self, num_envs: int, image_size: int = 0, max_episode_steps: int = 80, seed: int = 0, first: int | None = None
    ):
        self.num_envs, self.image_size, self.max_episode_steps = num_envs, image_size, max_episode_steps
        self.action_dim, self.state_dim = 2, 10
        self.prompts = list(PUSH_PROMPTS)
        self.camera_names = [PUSH_CAMERA] if image_size > 0 else []
        self.action_low, self.action_high = -np.ones(2, np.float32), np.ones(2, np.float32)
        self.first = first
        self._seed(seed)
        e = num_envs
        self.agent, self.block = np.zeros((e, 2)), np.zeros((e, 2))
        self.targets, self.prompt_id = np.zeros((e, 3, 2)), np.zeros(e, np.int32)
        self.elapsed, self.moved = np.zeros(e, np.int64), np.zeros(e, bool)
        self.reset_where(np.ones(e, bool))

    def reset(self, seed: int | None = None) -> tuple[Obs, dict]:
        """Reset all envs (re-seeding the envs' generators when `seed` is given)."""
        if seed is not None:
            self._seed(seed)
        return self.reset_where(np.ones(self.num_envs, bool)), {}

    def _seed(self, seed: int) -> None:
        """One generator for all envs (`first` None), or one per env seeded (seed, first + i)."""
        self._rng = np.random.default_rng(seed)
        first, n = self.first, self.num_envs
        self._rngs = [] if first is None else [np.random.default_rng([seed, first + i]) for i in range(n)]

    def reset_where(self, mask: np.ndarray) -> Obs:
        """Start new episodes in the envs where `mask` is True; returns the observation of all envs."""
        idx = np.flatnonzero(mask)
        groups = [(np.array([i]), self._rngs[i]) for i in idx] if self._rngs else [(idx, self._rng)]
        for rows, rng in groups:
            self._new_episodes(rows, rng)
        return self._obs()

    def _new_episodes(self, idx: np.ndarray, rng: np.random.Generator) -> None:
        n = len(idx)
        angle = rng.uniform(0, 2 * np.pi, n)[:, None] + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
        self.targets[idx] = self.target_radius * np.stack([np.cos(angle), np.sin(angle)], -1)
        r, phi = 0.45 * np.sqrt(rng.uniform(size=n)), rng.uniform(0, 2 * np.pi, n)
        block = np.stack([r * np.cos(phi), r * np.sin(phi)], -1)
        agent = rng.uniform(-0.9, 0.9, (n, 2))
        gap = agent - block  # keep the agent clear of the block at the start
        dist = np.linalg.norm(gap, axis=-1, keepdims=True)
        clear = self.agent_radius + self.block_radius + 0.05
        agent = np.where(dist < clear, block + gap / np.maximum(dist, 1e-6) * clear, agent)
        self.agent[idx], self.block[idx] = agent, block
        self.prompt_id[idx] = rng.integers(0, len(self.prompts), n)
        self.elapsed[idx], self.moved[idx] = 0, False

    def step(self, actions: np.ndarray, active: np.ndarray | None = None) -> tuple:
        """Advance the envs where `active` (default all) with actions [E, 2]; no autoreset."""
        act = np.ones(self.num_envs, bool) if active is None else np.asarray(active, bool)
        a = np.clip(np.asarray(actions, np.float64).reshape(self.num_envs, 2), -1.0, 1.0)
        ra, rb = self.agent_radius, self.block_radius
        agent = np.clip(self.agent + self.speed * a, -1 + ra, 1 - ra)
        gap = self.block - agent
        dist = np.linalg.norm(gap, axis=-1, keepdims=True)
        normal = np.where(dist > 1e-9, gap / np.maximum(dist, 1e-9), np.array([1.0, 0.0]))
        touch = dist[:, 0] < ra + rb
        block = np.where(touch[:, None], agent + normal * (ra + rb), self.block)
        block = np.clip(block, -1 + rb, 1 - rb)
        # A block stuck against a wall stops the agent: push the agent back out of the block.
        gap = block - agent
        dist = np.linalg.norm(gap, axis=-1, keepdims=True)
        agent = np.where(dist < ra + rb - 1e-9, block - normal * (ra + rb), agent)
        moved = np.linalg.norm(block - self.block, axis=-1) > 1e-9
        self.agent = np.where(act[:, None], agent, self.agent)
        self.block = np.where(act[:, None], block, self.block)
        self.moved |= act & moved
        self.elapsed += act
        goal = self.targets[np.arange(self.num_envs), self.prompt_id]
        success = act & (np.linalg.norm(self.block - goal, axis=-1) < self.success_radius)
        truncated = act & ~success & (self.elapsed >= self.max_episode_steps)
        reward = success.astype(np.float32)  # sparse: 1 at success
        info = {"success": success, "subgoal": act & (self.moved | touch)}
        return self._obs(), reward, success, truncated, info

    _STATE = ("agent", "block", "targets", "prompt_id", "elapsed", "moved")

    def get_state(self) -> dict[str, np.ndarray]:
        """Everything that changes as the envs run, the generators included: `set_state` continues exactly."""
        rng = np.array(json.dumps([g.bit_generator.state for g in self._rngs or [self._rng]]))
        return {"rng": rng, **{k: getattr(self, k).copy() for k in self._STATE}}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Continue from `get_state`'s output (of as many envs)."""
        if len(state["agent"]) != self.num_envs:
            raise RunError(f"the saved push state has {len(state['agent'])} envs, this one {self.num_envs}")
        for k in self._STATE:
            setattr(self, k, np.array(state[k], dtype=getattr(self, k).dtype))
        saved = json.loads(str(state["rng"]))
        if len(saved) != len(self._rngs or [self._rng]):
            raise RunError(f"the saved push state has {len(saved)} generators, this one {len(self._rngs) or 1}")
        for g, st in zip(self._rngs or [self._rng], saved, strict=True):
            g.bit_generator.state = st

    def _obs(self) -> Obs:
        state = np.concatenate([self.agent, self.block, self.targets.reshape(-1, 6)], -1).astype(np.float32)
        images = {PUSH_CAMERA: self.render()} if self.image_size > 0 else {}
        return {"state": state, "prompt_id": self.prompt_id.copy(), "images": images}

    def close(self) -> None:
        """Nothing to release (the interface of the other envs)."""

    def render(self) -> np.ndarray:
        """Draw all envs as uint8 [E, s, s, 3] (y up): targets, then the brown block, then the dark agent."""
        return self._draw(np.arange(self.num_envs), self.image_size or 64)

    def render_frames(self, idx: np.ndarray, size: int = 128) -> np.ndarray:
        """Video frames uint8 [n, size, size, 3] of envs `idx`: `render`'s drawing, framed in the colour of the target
        the prompt names."""
        img = self._draw(idx, size)
        edge = np.zeros((size, size), bool)
        w = max(size // 32, 1)
        edge[:w], edge[-w:], edge[:, :w], edge[:, -w:] = True, True, True, True
        colour = np.array(PUSH_COLOURS, np.uint8)[self.prompt_id[idx]]  # [n,3]
        return np.where(edge[None, :, :, None], colour[:, None, None], img)

    def _draw(self, idx: np.ndarray, s: int) -> np.ndarray:
        """uint8 [n, s, s, 3] of envs `idx`."""
        c = (np.arange(s) + 0.5) / s * 2 - 1
        xs, ys = c[None, None, :], -c[None, :, None]
        img = np.full((len(idx), s, s, 3), 235, np.uint8)
        shapes = [(self.targets[idx, i], self.success_radius, PUSH_COLOURS[i]) for i in range(3)]
        shapes += [(self.block[idx], self.block_radius, (140, 90, 40))]
        shapes += [(self.agent[idx], self.agent_radius, (30, 30, 30))]
        half_pixel = 1.0 / s  # keep small discs visible at low resolution
        for pos, radius, colour in shapes:
            d2 = (xs - pos[:, 0, None, None]) ** 2 + (ys - pos[:, 1, None, None]) ** 2
            img[d2 < max(radius, half_pixel) ** 2] = colour
        return img


class PushDemonstrator:
    """Scripted expert for `push`: go around the block to behind it (seen from the named target), then push. `noise`:
    the std of Gaussian noise added to each action before clipping."""

    def __init__(self, noise: float, seed: int = 0):
        self.noise, self._rng = noise, np.random.default_rng(seed)

    def act(self, obs: Obs) -> np.ndarray:
        """Actions [E, 2] for a batch of push observations."""
        s = np.asarray(obs["state"], np.float64)
        agent, block, targets = s[:, 0:2], s[:, 2:4], s[:, 4:10].reshape(-1, 3, 2)
        goal = targets[np.arange(len(s)), obs["prompt_id"]]
        c = PushEnv.agent_radius + PushEnv.block_radius
        u = _unit(goal - block)
        rel = agent - block
        along = np.sum(rel * u, -1, keepdims=True)  # < 0: the agent is behind the block
        side = rel - along * u
        perp = np.linalg.norm(side, axis=-1, keepdims=True)
        behind = block - u * (c + 0.03)
        # Aligned behind the block: push towards the goal, steering back onto the block-goal line.
        aligned = (along < -0.5 * c) & (perp < 0.5 * c)
        push = _unit(u - 3.0 * side / c)
        # Otherwise walk to the point behind the block; if the block is in the way, go round it by its side first.
        to_behind = behind - agent
        frac = np.sum((block - agent) * to_behind, -1, keepdims=True) / np.sum(to_behind**2, -1, keepdims=True)
        frac = np.clip(np.nan_to_num(frac), 0, 1)  # closest point to the block on the straight path
        blocked = np.linalg.norm(agent + frac * to_behind - block, axis=-1, keepdims=True) < c + 0.01
        side_dir = np.where(perp > 1e-6, side / np.maximum(perp, 1e-6), np.stack([-u[:, 1], u[:, 0]], -1))
        around = block + side_dir * (c + 0.08) - u * 0.06
        waypoint = np.where(blocked, around, behind)
        approach = (waypoint - agent) / PushEnv.speed
        approach = approach / np.maximum(1.0, np.linalg.norm(approach, axis=-1, keepdims=True))
        action = np.where(aligned, push, approach)
        action = action + self.noise * self._rng.standard_normal(action.shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


# ----------------------------------------------------------------------------------------------------- datasets
def make_dataset(
    path: str | os.PathLike,
    env: str = "push",
    episodes: int = 1000,
    noise: float | str = 0.6,
    seed: int = 0,
    image_size: int = 0,
    num_envs: int = 250,
) -> str:
    """Roll out the push demonstrator into robomimic/LIBERO-layout HDF5 at `path` (returned); `dones` are true
    terminations, attr `truncated` the time limits. `noise="mixed"` splits the episodes over `MIXED_NOISES`."""
    if env != "push":
        raise ValueError(f"make_dataset only knows env='push' (got {env!r}); LIBERO demos come as HDF5 files already.")
    noises = list(MIXED_NOISES) if noise == "mixed" else [float(noise)]
    counts = [episodes // len(noises) + (i < episodes % len(noises)) for i in range(len(noises))]
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n_written, successes = 0, 0
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for j, (nz, count) in enumerate(zip(noises, counts, strict=True)):
            pusher = PushEnv(min(num_envs, max(count, 1)), image_size=image_size, seed=seed * 1000 + j)
            expert = PushDemonstrator(nz, seed=seed * 1000 + j + 1)
            done_eps = 0
            while done_eps < count:
                for ep in _rollout_batch(pusher, expert, min(pusher.num_envs, count - done_eps)):
                    g = data.create_group(f"demo_{n_written}")
                    for key in ("actions", "rewards", "dones"):
                        g.create_dataset(key, data=ep[key])
                    g.create_dataset("obs/state", data=ep["state"])
                    g.create_dataset("obs/subgoal", data=ep["subgoal"])
                    if image_size > 0:
                        g.create_dataset(f"obs/{PUSH_CAMERA}", data=ep["images"], compression="lzf", chunks=True)
                    g.attrs.update(num_samples=len(ep["actions"]), truncated=ep["truncated"], noise=nz)
                    g.attrs.update(success=ep["success"], language_instruction=PUSH_PROMPTS[ep["prompt_id"]])
                    n_written, successes, done_eps = n_written + 1, successes + ep["success"], done_eps + 1
        first = data["demo_0"].attrs["language_instruction"] if n_written else PUSH_PROMPTS[0]
        info = {"language_instruction": first, "prompts": PUSH_PROMPTS}
        env_kwargs = {"image_size": image_size, "max_episode_steps": 80, "noise": noise, "seed": seed}
        data.attrs["problem_info"] = json.dumps(info)
        data.attrs["env_args"] = json.dumps({"env_name": "push", "type": "pi0rl", "env_kwargs": env_kwargs})
        data.attrs["total"] = int(sum(data[d].attrs["num_samples"] for d in data))
        data.attrs["success_rate"] = successes / max(n_written, 1)
    return path


def _rollout_batch(env: PushEnv, expert: PushDemonstrator, n: int) -> list[dict]:
    """Run one episode in each of the first `n` envs of `env`; returns per-episode arrays."""
    obs, _ = env.reset(seed=int(env._rng.integers(2**31)))
    prompt_id = obs["prompt_id"].copy()
    active = np.arange(env.num_envs) < n
    steps: list[dict] = []
    end = np.full(env.num_envs, -1)
    truncated = np.zeros(env.num_envs, bool)
    while active.any():
        actions = expert.act(obs)
        nxt, reward, term, trunc, info = env.step(actions, active=active)
        steps.append(
            {
                "state": obs["state"],
                "images": obs["images"].get(PUSH_CAMERA),
                "actions": actions,
                "rewards": reward,
                "dones": term.astype(np.uint8),
                "subgoal": info["subgoal"].astype(np.uint8),
            }
        )
        ended = active & (term | trunc)
        end[ended], truncated[ended] = len(steps), trunc[ended]
        active, obs = active & ~ended, nxt
    keys = [k for k in steps[0] if k != "images" or env.image_size > 0]
    arrays = {k: np.stack([s[k] for s in steps], 1) for k in keys}  # [E, T, ...]
    episodes = []
    for e in range(n):
        ep = {k: v[e, : end[e]] for k, v in arrays.items()}
        ep.update(truncated=bool(truncated[e]), success=bool(ep["dones"][-1]), prompt_id=int(prompt_id[e]))
        episodes.append(ep)
    return episodes


def default_dataset(env: str = "push", noise: float | str = 0.6, episodes: int = 1000, image_size: int = 0) -> str:
    """A cached demonstrator dataset under `$PI0RL_DATA` (default `~/.cache/pi0rl`), generated once; its path."""
    root = Path(os.environ.get("PI0RL_DATA", Path.home() / ".cache" / "pi0rl"))
    noise = noise if noise == "mixed" else float(noise)
    path = root / f"{env}_noise{noise}_episodes{episodes}_image{image_size}_seed0.h5"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}.h5")
        start = time.time()
        make_dataset(tmp, env=env, episodes=episodes, noise=noise, image_size=image_size)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache file
        print(f"generated {episodes} {env} demos (noise {noise}) in {time.time() - start:.1f}s -> {path}")
    return str(path)


# ----------------------------------------------------------------------------------------------------- which env
def make_env(name: str, num_envs: int, seed: int = 0, **kw: Any) -> Any:
    """'push' -> `PushEnv`; 'libero' -> `libero.make_libero_env`; anything else -> `gymenv.GymVecEnv`."""
    if name == "libero":
        from common import libero

        return libero.make_libero_env(num_envs=num_envs, seed=seed, **kw)
    kw.pop("total", None)
    if name == "push":
        return PushEnv(num_envs, seed=seed, **kw)
    image_size = kw.pop("image_size", 0)
    if image_size:
        raise RunError(f"image_size={image_size}: gymnasium envs ({name!r}) are state-only; use image_size=0.")
    from common.gymenv import GymVecEnv

    return GymVecEnv(name, num_envs, seed=seed, **kw)


def check_horizon(env: Any, horizon: int, name: str) -> None:
    """Refuse a chunk longer than the env's episodes (one chunk would end every episode)."""
    steps = getattr(env, "max_episode_steps", None)
    if steps and horizon > steps:
        raise RunError(f"--action-horizon {horizon} is longer than an episode of {name} ({steps} steps): shorten it")


def check_batch(chunks: Any, batch_size: int, flag: str) -> None:
    """Say so when the prior data holds fewer chunks than a batch: batches then repeat chunks."""
    if len(chunks) < batch_size:
        print(f"note: the prior data has {len(chunks)} chunks, fewer than {flag} {batch_size}: batches repeat them")


@dataclass(frozen=True)
class EnvSpec:
    """Which environment a run uses (`make_spec` builds it from a script's flags): `name` ('push', 'libero' or a
    gymnasium id), `kwargs` for `make_env`, the `dataset` whose image size LIBERO renders at unless `kwargs` set one,
    and the reward transform. It holds the evaluation envs kept between evaluations until `close`."""

    name: str
    kwargs: dict[str, Any]
    dataset: str | None = None
    reward: tuple[float, float] = (1.0, 0.0)  # (a, b): rewards a·r + b, the env's and the dataset's (`ScaledReward`)
    kept: dict[tuple, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def make(
        self,
        num_envs: int,
        seed: int,
        evaluation: bool = False,
        first: int = 0,
        total: int | None = None,
        render: bool = False,
    ) -> Any:
        """`num_envs` envs, envs `first`.. of a run's `total` (default `num_envs`), each seeded by its index in the run.
        Evaluation envs: LIBERO's play the suite's fixed initial states; gymnasium's are made once and kept (their
        workers take seconds to start; `evaluate` reseeds them, so a kept env plays what a new one would). `render`:
        gymnasium's are made with render_mode="rgb_array" (for `render_frames`; push and LIBERO always can)."""
        key = (num_envs, first, total, render)
        if evaluation and key in self.kept:
            return self.kept[key]
        kw = dict(self.kwargs, first=first, total=total or num_envs)
        if render and self.name not in ("push", "libero"):
            kw.setdefault("render_mode", "rgb_array")
        if self.name == "libero":  # rendered at the dataset's image size unless told; evaluation: fixed init states
            kw.update(dataset=self.dataset, eval_mode=kw.get("eval_mode", evaluation))
        env = make_env(self.name, num_envs, seed=seed, **kw)
        env = env if self.reward == (1.0, 0.0) else ScaledReward(env, *self.reward)
        if evaluation and self.name not in ("push", "libero"):  # LIBERO's not: a used simulator settles an init
            self.kept[key] = env  # state ~3 mm of gripper away from a new one, and a resumed run starts with new ones
        return env

    def close(self) -> None:
        """Close the kept evaluation envs."""
        for env in self.kept.values():
            env.close()
        self.kept.clear()

    def make_share(self, num_envs: int, seed: int, evaluation: bool = False) -> Any:
        """This process's share (`mesh.process_rows`) of a run's `num_envs` envs: all shares make one process's."""
        if num_envs % jax.process_count():
            raise RunError(
                f"--num-envs {num_envs} must be a multiple of the {jax.process_count()} processes: each "
                "steps an equal share of the envs"
            )
        rows = mesh.process_rows(num_envs)
        return self.make(rows.stop - rows.start, seed, evaluation, first=rows.start, total=num_envs)

    @property
    def image_size(self) -> int:
        """The image size the kwargs ask for (0: the env's or the dataset's own)."""
        return int(self.kwargs.get("image_size") or 0)


def make_spec(name: str, env_kwargs: dict[str, str], dataset: str | None = None, image_size: int = 0) -> EnvSpec:
    """An `EnvSpec` from flag values: `env_kwargs` decoded as JSON where they parse (a bare word stays a string),
    `image_size` added unless they give one, a gymnasium env's prompt the dataset's instruction. Refused before any
    env is made: a value that looks like JSON and does not parse; for push and libero a key they do not take."""
    kw = {k: _decode(k, v) for k, v in (env_kwargs or {}).items()}
    reward = (kw.pop("reward_scale", 1.0), kw.pop("reward_shift", 0.0))
    numbers = all(isinstance(x, (int, float)) and math.isfinite(x) for x in reward)
    if not numbers or reward[0] <= 0:
        raise RunError(
            f"--env-kwargs reward_scale {reward[0]} reward_shift {reward[1]}: finite numbers, the scale > 0 (r → "
            "scale·r + shift; a scale ≤ 0 would reverse or erase the task)"
        )
    if name in ("push", "libero"):
        target = PushEnv if name == "push" else importlib.import_module("common.libero").LiberoVecEnv
        params = inspect.signature(target).parameters
        takes = [p for p in params if p not in ("num_envs", "seed", "first", "total")]
        takes += ["reward_scale", "reward_shift"]  # every env takes these (the rewards a·r + b)
        unknown = sorted(set(kw) - set(takes))
        if unknown:
            raise RunError(f"--env-kwargs {' '.join(unknown)}: {name} does not take it; it takes {', '.join(takes)}")
        switches = [k for k in kw if k in params and isinstance(params[k].default, bool)]  # e.g. libero's async_envs
        for k in switches:
            if not isinstance(kw[k], bool):
                raise RunError(f"--env-kwargs {k} {env_kwargs[k]}: true or false")
    steps = kw.get("max_episode_steps")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise RunError(f"--env-kwargs max_episode_steps {steps}: a whole number of steps ≥ 1")
    if image_size:
        kw.setdefault("image_size", image_size)
    if name not in ("push", "libero") and dataset and "prompt" not in kw:  # the data's instruction, sent by the env
        from common import gymenv

        kw["prompt"] = gymenv.dataset_prompt(dataset)
    return EnvSpec(name, kw, dataset, (float(reward[0]), float(reward[1])))


def _decode(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        if value.lstrip().startswith(("[", "{", '"')):
            raise RunError(f"--env-kwargs {key} {value}: not valid JSON ({e.msg}); e.g. {key} '[0,3]'") from None
        return value  # a plain string, e.g. a suite name


class ScaledReward:
    """An env whose rewards are a·r + b (`--env-kwargs reward_scale A reward_shift B`; `data.load_dataset` transforms
    its dataset the same way); success and everything else are the env's."""

    def __init__(self, env: Any, scale: float, shift: float):
        self.env, self.reward_transform = env, (scale, shift)

    def __getattr__(self, name: str) -> Any:  # everything else is the env's
        return getattr(self.env, name)

    def step(self, actions: np.ndarray, active: np.ndarray | None = None) -> tuple:
        a, b = self.reward_transform
        obs, r, term, trunc, info = self.env.step(actions, active=active)
        r = a * np.asarray(r, np.float32) + b
        if active is not None:  # envs not stepped report 0
            r = np.where(active, r, 0.0)
        return obs, r.astype(np.float32), term, trunc, info


# ----------------------------------------------------------------------------------------------------- chunks
@jax.tree_util.register_dataclass  # a pytree: `mesh.all_rows` gathers it
@dataclass
class ChunkStep:
    """What executing one action chunk [E, H, A] open loop did (numpy arrays; see `execute_chunk`)."""

    rewards: np.ndarray  # [E, H] float32, 0 after the episode ended
    discounted_return: np.ndarray  # [E] sum_k gamma^k r_k over executed steps
    valid: np.ndarray  # [E, H] bool, step k was executed
    terminated: np.ndarray  # [E] bool, the episode terminated inside this chunk
    truncated: np.ndarray  # [E] bool, the episode hit its time limit inside this chunk
    step_terminated: np.ndarray  # [E, H] bool
    step_truncated: np.ndarray  # [E, H] bool
    success: np.ndarray  # [E] bool
    final_obs: Obs  # obs at t+H, or the last obs of an ended episode (before any reset)


def execute_chunk(env: Any, obs: Obs, actions: np.ndarray, gamma: float) -> tuple[Obs, ChunkStep]:
    """Execute actions [E, H, A] open loop; an env whose episode ends at step k is not stepped after k. Envs that ended
    are reset at the chunk boundary: `next_obs` holds their fresh obs, `step.final_obs` their last."""
    e, h = actions.shape[:2]
    active = np.ones(e, bool)
    out = {k: np.zeros((e, h), bool) for k in ("valid", "step_terminated", "step_truncated")}
    out["rewards"] = np.zeros((e, h), np.float32)
    success = np.zeros(e, bool)
    final_obs = _copy_obs(obs)
    for k in range(h):
        if not active.any():
            break
        o, r, term, trunc, info = env.step(actions[:, k], active=active)
        term, trunc = active & np.asarray(term, bool), active & np.asarray(trunc, bool) & ~np.asarray(term, bool)
        out["rewards"][:, k] = np.where(active, r, 0.0)
        out["valid"][:, k] = active
        out["step_terminated"][:, k], out["step_truncated"][:, k] = term, trunc
        success |= active & np.asarray(info.get("success", np.zeros(e, bool)), bool)
        final_obs = _select(active, o, final_obs)
        active = active & ~(term | trunc)
    terminated, truncated = out["step_terminated"].any(1), out["step_truncated"].any(1)
    discounted = (out["rewards"] * gamma ** np.arange(h, dtype=np.float32)).sum(1)
    step = ChunkStep(
        discounted_return=discounted.astype(np.float32),
        terminated=terminated,
        truncated=truncated,
        success=success,
        final_obs=final_obs,
        **out,
    )
    ended = terminated | truncated
    next_obs = env.reset_where(ended) if ended.any() else _copy_obs(final_obs)
    return next_obs, step


def loop_state(env: Any, obs: Obs) -> dict[str, Any]:
    """What continuing an env loop exactly needs, for a checkpoint's host arrays: the observation and the env's state
    where it can save it (push); {} when it cannot (gymnasium, LIBERO)."""
    return {"obs": obs, "env": env.get_state()} if hasattr(env, "get_state") else {}


def resume_loop(env: Any, saved: dict[str, Any], seed: int) -> Obs:
    """The observation to continue the env loop from `loop_state`'s restored output; an env that could not save its
    state starts new episodes here, seeded `seed` (the resumed run then differs from an uninterrupted one)."""
    if saved:
        env.set_state(saved["env"])
        return saved["obs"]
    print(f"{type(env).__name__} cannot save its state: its envs start new episodes at the resume (seed {seed})")
    return env.reset(seed=seed)[0]


@dataclass
class EvalTrace:
    """What an evaluation's envs did, for a script to measure more than success (e.g. a critic's calibration): the
    rewards and episode ends of every step, what `act` reported with each chunk, and the recorded episodes' frames
    (this process's envs)."""

    rewards: np.ndarray  # [T,E] every step's reward, 0 outside the evaluated episodes
    ends: np.ndarray  # [T,E] an episode ended (terminated or truncated) at this step
    chunks: list[tuple[int, np.ndarray, np.ndarray]]  # per chunk: (its first step, act's report [E], evaluated [E])
    videos: list[tuple[np.ndarray, bool, int]] = field(default_factory=list)  # (frames [L+1,h,w,3] uint8, success, L)


def evaluate(
    spec: EnvSpec,
    act: Callable[[Obs, jax.Array], tuple[Any, Any]],
    rng: jax.Array,
    *,
    episodes: int,
    num_envs: int,
    seed: int,
    horizon: int,
    gamma: float = 1.0,
    prefix: str = "",
    max_chunks: int | None = None,
    record: int = 0,
) -> tuple[dict[str, float], EvalTrace]:
    """eval/{prefix}success_rate and eval/{prefix}return of a chunk policy over `episodes` episodes of `spec`'s
    evaluation envs: E = min(num_envs, episodes) envs (on several processes rounded up to a multiple of their number,
    each its share), env e playing episodes e, e + E, ...; chunks of `horizon` actions executed open loop. Every
    process returns the same numbers (`act` is then collective). An episode still running after `max_chunks` chunks
    (None: one more than the time limit allows) counts as a failure with return 0. Also returns the `EvalTrace`, with
    the frames of the first `record` episodes (envs 0..record−1's first; this process's of them): only those envs
    render, and none without `record`.

    act(obs, key) -> (actions [E,H,A] in env units, a report [E] or None: e.g. a critic's value of the chunk), a key
    split off `rng` per chunk.
    """
    E = -(-min(num_envs, episodes) // jax.process_count()) * jax.process_count()
    mine = mesh.process_rows(E)  # this process's envs of the E
    recorded = int(np.clip(min(record, E) - mine.start, 0, mine.stop - mine.start))  # this process's recorded envs
    env = spec.make(mine.stop - mine.start, seed, evaluation=True, first=mine.start, total=E, render=recorded > 0)
    played = env
    if recorded:  # the recorded envs draw their frames
        from common.video import Recorder

        played = Recorder(env, recorded)
    obs, _ = played.reset(seed=seed)
    todo = (episodes - np.arange(E)[mine] + E - 1) // E  # episodes each env still has to play
    success = np.zeros(len(todo), bool)  # of each env's current episode (this process's envs)
    ret = np.zeros(len(todo))
    n_success, total = 0, 0.0
    rewards, ends, chunks = [], [], []  # per step [E]: rewards (0 outside evaluated episodes), an episode ended
    per_episode = max_chunks or math.ceil((getattr(env, "max_episode_steps", None) or 1000) / horizon) + 1
    for _ in range(per_episode * ((episodes + E - 1) // E)):
        rng, key = jax.random.split(rng)
        actions, report = act(obs, key)
        live = todo > 0
        if report is not None:
            chunks.append((len(rewards), np.asarray(report), live))
        obs, step = execute_chunk(played, obs, np.asarray(actions), gamma)
        rewards += list(np.where(live, step.rewards.T, 0.0))  # H rows [E]
        ends += list((step.step_terminated | step.step_truncated).T)
        success = success | step.success
        ret = ret + step.rewards.sum(1)
        ended = step.terminated | step.truncated
        n_success += (success & ended & live).sum()
        total += ret[ended & live].sum()
        success = success & ~ended
        ret = np.where(ended, 0.0, ret)
        todo -= ended & live
        if not mesh.anywhere(todo.any()):  # every process's envs are done
            break
    if env not in spec.kept.values():
        env.close()
    n_success, total = mesh.process_sum([n_success, total])
    out = {f"eval/{prefix}success_rate": float(n_success / episodes), f"eval/{prefix}return": float(total / episodes)}
    videos = played.videos() if recorded else []
    return out, EvalTrace(np.stack(rewards), np.stack(ends), chunks, videos)


def calibration(trace: EvalTrace, gamma: float, prefix: str = "") -> dict[str, float]:
    """A critic's calibration over every chunk an evaluation reported a value for (`EvalTrace.chunks`, act's report):
    the mean value (eval/{prefix}q_pred) against the mean discounted return that followed each chunk until its
    episode's end (eval/{prefix}q_realised), and their gap; summed over every process's envs."""
    togo = np.zeros_like(trace.rewards)  # [T,E]: every step's discounted return to its episode's end
    acc = np.zeros(trace.rewards.shape[1])
    for t in range(len(togo) - 1, -1, -1):
        acc = trace.rewards[t] + gamma * np.where(trace.ends[t], 0.0, acc)
        togo[t] = acc
    pred = np.concatenate([q[live] for _, q, live in trace.chunks])
    real = np.concatenate([togo[t][live] for t, _, live in trace.chunks])
    pred, real, n = mesh.process_sum([pred.sum(), real.sum(), len(pred)])  # every process's envs
    out = {f"eval/{prefix}q_pred": float(pred / n), f"eval/{prefix}q_realised": float(real / n)}
    out[f"eval/{prefix}q_gap"] = float((pred - real) / n)
    return out
