"""Data for chunked RL: every dataset reader into one episode type (`EpisodeData`), chunk transitions with their
masks, the online replay buffer and normalisation statistics. The robomimic/LIBERO HDF5 reader is here; LeRobot's is
in `common.openpi`, OGBench/D4RL npz and Minari in `common.gymenv`, imported by `load_dataset` when a path needs them.

A chunk transition at frame t of an episode of length L (H = horizon, gamma = discount):
  obs o_t; actions a_t..a_{t+H-1} (past the episode's end: the last action repeated, `valid` False there);
  rewards r_{t+k} (0 where not valid); discounted_return = sum_k gamma^k r_{t+k} over valid k;
  next_obs o_{t+H}, or the episode's last stored frame o_{L-1} when t+H >= L;
  mask = 0 iff a true termination happens in steps t..t+H-1 (truncation is not termination);
  n_valid = the number of valid steps (a TD target discounts its bootstrap by gamma^n_valid);
  return_to_go = sum_k gamma^k r_{t+k} to the episode's end; past a time limit the last reward is taken to repeat
  forever (gamma^(L-t) r_{L-1} / (1 - gamma)); NaN for online chunks, whose episode had not ended when stored.
A dataset episode that ends without a termination is not terminated; its successor is not stored, so next_obs is
o_{L-1} there (exact when rewards are zero there). Online chunks (`ReplayBuffer`) store the true final observation.
Batches are dicts of numpy arrays: obs / next_obs {"state": f32[B, S], "prompt_id": i32[B], "images": {cam:
u8[B, h, w, 3]}}, actions f32[B, H, A] and the per-chunk `CHUNK_KEYS`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common import RunError

Batch = dict[str, Any]

# LIBERO camera keys -> openpi camera names. LIBERO's stored images are upside down (OpenGL): rotate them 180°.
LIBERO_CAMERAS = {"agentview_rgb": "base_0_rgb", "eye_in_hand_rgb": "left_wrist_0_rgb"}
# Without `obs/state`: LIBERO's eef position (3) + axis-angle (3) + the two gripper joints (2), as openpi uses it.
LIBERO_STATE_KEYS = ("ee_pos", "ee_ori", "gripper_states")


class DatasetError(RunError):
    """A dataset file is missing or does not have the expected layout."""


@dataclass
class EpisodeData:
    """All frames of all episodes, concatenated (each frame stored once). N frames, E episodes."""

    obs: dict[str, Any]  # {"state": f32[N, S], "prompt_id": i32[N], "images": {cam: u8[N, h, w, 3]}}
    actions: np.ndarray  # f32[N, A]
    rewards: np.ndarray  # f32[N]
    terminals: np.ndarray  # bool[N], a true termination at this step
    subgoal: np.ndarray  # bool[N]
    episode_starts: np.ndarray  # i64[E]
    episode_lengths: np.ndarray  # i64[E]
    truncated: np.ndarray  # bool[E], the episode ended at a time limit
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.actions)


# ----------------------------------------------------------------------------------------------------- readers
def load_dataset(path: str | os.PathLike, env: Any, image_size: int = 0) -> EpisodeData:
    """Prior data for `env`: robomimic/LIBERO HDF5 (a file or a folder of them), a LeRobot folder (images resized to
    `image_size`, 0: `openpi.LEROBOT_IMAGE_SIZE`), an OGBench/D4RL .npz file or a Minari folder. Prompt ids index the
    env's prompts, then the data's new ones; the env's reward transform (`envs.ScaledReward`) applies to the data."""
    if is_lerobot(path):
        from common import openpi

        data = openpi.load_lerobot(path, prompts=env.prompts, image_size=image_size or openpi.LEROBOT_IMAGE_SIZE)
    elif str(path).endswith(".npz"):
        from common import gymenv

        data = gymenv.load_npz(path, getattr(env, "env_id", ""), prompts=env.prompts)
    elif is_minari(path):
        from common import gymenv

        data = gymenv.load_minari(path, prompts=env.prompts)
    else:
        data = load_episodes(path, prompts=env.prompts)  # refuses NaN / inf per file and demo as it reads
    if data.actions.shape[1] != env.action_dim:
        raise RunError(f"{path}: actions have {data.actions.shape[1]} dims, the environment's {env.action_dim}")
    if getattr(env, "state_dim", data.obs["state"].shape[1]) != data.obs["state"].shape[1]:
        raise RunError(
            f"{path}: observations have {data.obs['state'].shape[1]} dims, the environment's "
            f"{env.state_dim}: is it this env's dataset?"
        )
    if (transform := getattr(env, "reward_transform", None)) is not None:  # the env's a·r + b, on the data too
        data.rewards = (transform[0] * data.rewards + transform[1]).astype(np.float32)
    return data


def hdf5_files(p: Path) -> list[Path]:
    """The .hdf5/.h5 files of a folder, or [p] for a file."""
    return sorted([*p.glob("*.hdf5"), *p.glob("*.h5")]) if p.is_dir() else [p]


def _dataset_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: no such file; check the path, or write one with `python -m common make-dataset`")
    if p.is_dir() and not hdf5_files(p):
        raise DatasetError(f"{p}: directory holds no .hdf5/.h5 files; point to a dataset file or folder.")
    return hdf5_files(p)


def _open(path: Path) -> h5py.File:
    """`h5py.File(path, "r")`, or a DatasetError naming the file when it is empty, truncated or not HDF5."""
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(
            f"{path}: not a readable HDF5 file ({e}); is it empty, truncated or still being written? "
            "Write it again (python -m common make-dataset for push)"
        ) from None


def _demo_names(data: h5py.Group) -> list[str]:
    return sorted(data.keys(), key=lambda k: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", k)])


def demo_instruction(demo: h5py.Group, info: dict[str, Any]) -> str:
    """A demo's attr `language_instruction`, else the file's `problem_info["language_instruction"]`, else ""."""
    lang = demo.attrs.get("language_instruction", info.get("language_instruction", ""))
    return lang.decode() if isinstance(lang, bytes) else str(lang)


def load_episodes(dataset: str | Path, prompts: list[str] | None = None) -> EpisodeData:
    """Episodes of robomimic/LIBERO-layout HDF5 files (a file or a folder of them): per demo `data/demo_<i>`
    `actions`, `rewards`, `dones`, `obs/state` (else `LIBERO_STATE_KEYS`), every uint8 obs [T, h, w, 3] as an image
    (LIBERO's renamed and rotated 180°); instructions index `prompts`, new ones appended."""
    prompts = list(prompts or [])
    files = _dataset_files(dataset)
    # Pass 1: check the layout and collect lengths, so that the frames are copied once into preallocated arrays.
    plan: list[tuple[Path, str, int, str, bool]] = []
    layout: dict[str, Any] | None = None
    for path in files:
        try:
            with _open(path) as f:
                if "data" not in f:
                    raise DatasetError(
                        f"{path}: no 'data' group (found {list(f.keys())}); expected data/demo_<i>/... ."
                    )
                info = json.loads(f["data"].attrs.get("problem_info", "{}") or "{}")
                prompts += [p for p in info.get("prompts", []) if p not in prompts]  # keep a writer's prompt order
                for name in _demo_names(f["data"]):
                    g = f["data"][name]
                    here = _demo_layout(path, name, g)
                    if layout is None:
                        layout = here
                    elif here != layout:
                        raise DatasetError(
                            f"{path}:{name}: observation layout {here} differs from the first demo's {layout}."
                        )
                    length = len(g["actions"])
                    if length < 1:
                        raise DatasetError(f"{path}:{name}: an episode without steps; drop it from the file")
                    lang = demo_instruction(g, info)
                    plan.append((path, name, length, lang, bool(g.attrs.get("truncated", False))))
        except OSError as e:  # a truncated file: h5py opens it, reading its index fails
            raise DatasetError(f"{path}: unreadable ({e}); the file looks truncated or still being written") from None
    if not plan or layout is None:
        where = ", ".join(str(f) for f in files)
        raise DatasetError(f"{where}: no episodes found under data/ (robomimic/LIBERO layout: data/demo_<i>/actions)")
    n, lengths = sum(p[2] for p in plan), np.array([p[2] for p in plan], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    obs = {
        "state": np.zeros((n, layout["state_dim"]), np.float32),
        "prompt_id": np.zeros(n, np.int32),
        "images": {cam: np.zeros((n, *shape), np.uint8) for cam, (_, shape) in layout["images"].items()},
    }
    actions = np.zeros((n, layout["action_dim"]), np.float32)
    rewards, terminals, subgoal = np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool)
    # Pass 2: fill.
    for path in files:
        mine = [(i, p) for i, p in enumerate(plan) if p[0] == path]
        if not mine:
            continue
        with _open(path) as f:
            for i, (_, name, length, lang, _) in mine:
                rows = slice(starts[i], starts[i] + length)
                try:
                    _read_demo(f["data"][name], rows, length, layout, obs, actions, rewards, terminals, subgoal)
                except OSError as e:  # a half-written file: its index is there, its data is not
                    raise DatasetError(f"{path}:data/{name}: unreadable ({e}); the file looks truncated") from None
                for key, x in (("obs/state", obs["state"]), ("actions", actions), ("rewards", rewards)):
                    if not np.isfinite(x[starts[i] : starts[i] + length]).all():
                        raise DatasetError(f"{path}:data/{name}: {key} holds NaN or inf; fix or drop this episode")
                if lang not in prompts:
                    prompts.append(lang)
                obs["prompt_id"][starts[i] : starts[i] + length] = prompts.index(lang)
    truncated = np.array([p[4] for p in plan], bool)
    return EpisodeData(obs, actions, rewards, terminals, subgoal, starts, lengths, truncated, prompts)


def refuse_non_finite(path: str | Path, data: EpisodeData) -> None:
    """A DatasetError naming the episode, key and frame of the first NaN or inf in state, actions or rewards."""
    for key, x in (("state", data.obs["state"]), ("actions", data.actions), ("rewards", data.rewards)):
        if not np.isfinite(x).all():
            frame = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(1))[0])
            episode = int(np.searchsorted(data.episode_starts, frame, side="right") - 1)
            raise DatasetError(f"{path}: episode {episode} has NaN or inf in {key} (frame {frame}); fix or drop it")


def _read_demo(g: h5py.Group, sl: slice, length: int, layout: dict, obs: dict, *out: np.ndarray) -> None:
    """Copy one demo group into the preallocated arrays (actions, rewards, terminals, subgoal) at rows `sl`."""
    actions, rewards, terminals, subgoal = out
    o = g["obs"]
    if "state" in o:
        obs["state"][sl] = np.asarray(o["state"]).reshape(length, -1)
    else:
        obs["state"][sl] = np.concatenate([np.asarray(o[k]).reshape(length, -1) for k in LIBERO_STATE_KEYS], 1)
    for cam, (key, _) in layout["images"].items():
        img = np.asarray(o[key])
        obs["images"][cam][sl] = img[:, ::-1, ::-1] if key in LIBERO_CAMERAS else img
    actions[sl] = np.asarray(g["actions"]).reshape(length, -1)
    rewards[sl] = np.asarray(g["rewards"]).reshape(length)
    terminals[sl] = np.asarray(g["dones"]).reshape(length) > 0
    if "subgoal" in o:
        subgoal[sl] = np.asarray(o["subgoal"]).reshape(length) > 0


def _demo_layout(path: Path, name: str, g: h5py.Group) -> dict[str, Any]:
    """Check one demo group's keys; returns its state/action dims and {camera: (file key, image shape)}."""
    where = f"{path}:data/{name}"
    missing = [k for k in ("actions", "rewards", "dones", "obs") if k not in g]
    if missing:
        raise DatasetError(
            f"{where}: missing {missing}; it has {sorted(g.keys())}. Expected actions, rewards, dones, obs/."
        )
    o = g["obs"]
    if "state" in o:
        state_dim = int(np.prod(o["state"].shape[1:]))
    elif all(k in o for k in LIBERO_STATE_KEYS):
        state_dim = sum(int(np.prod(o[k].shape[1:])) for k in LIBERO_STATE_KEYS)
    else:
        raise DatasetError(
            f"{where}/obs: no 'state' key and not the LIBERO keys {list(LIBERO_STATE_KEYS)}; "
            f"it has {sorted(o.keys())}. Store the proprioceptive state as obs/state."
        )
    found = {k: o[k] for k in o if o[k].dtype == np.uint8 and o[k].ndim == 4 and o[k].shape[-1] == 3}
    images = {LIBERO_CAMERAS.get(k, k): (k, tuple(v.shape[1:])) for k, v in found.items()}
    return {"state_dim": state_dim, "action_dim": int(np.prod(g["actions"].shape[1:])), "images": images}


def is_lerobot(path: str | os.PathLike) -> bool:
    """A LeRobot dataset folder (`meta/tasks.jsonl` or `data/**/*.parquet`), e.g. openpi's LIBERO data."""
    p = Path(path)
    return p.is_dir() and ((p / "meta" / "tasks.jsonl").exists() or any(p.glob("data/**/*.parquet")))


def is_minari(path: str | os.PathLike) -> bool:
    """A Minari dataset folder (holding `data/main_data.hdf5` or `data/metadata.json`)."""
    p = Path(path)
    return (p / "data" / "metadata.json").exists() or (p / "metadata.json").exists() and (p / "main_data.hdf5").exists()


# ----------------------------------------------------------------------------------------------------- chunks
def norm_stats(data: EpisodeData) -> dict[str, dict[str, np.ndarray]]:
    """{"state": stats, "actions": stats} of a dataset's frames, each {"mean", "std", "q01", "q99"} float32 [D]
    (openpi's norm_stats.json; `pi0.normalize`'s layout)."""
    out = {}
    for key, x in (("state", data.obs["state"]), ("actions", data.actions)):
        x = np.asarray(x, np.float64)
        q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
        stats = {"mean": x.mean(0), "std": x.std(0), "q01": q01, "q99": q99}
        out[key] = {k: np.asarray(v, np.float32) for k, v in stats.items()}
    return out


def gather_obs(obs: dict[str, Any], idx: np.ndarray) -> dict[str, Any]:
    """Rows `idx` of a frame-major observation dict ({"state", "prompt_id", "images"}, e.g. `EpisodeData.obs`)."""
    images = {k: v[idx] for k, v in obs["images"].items()}
    return {"state": obs["state"][idx], "prompt_id": obs["prompt_id"][idx], "images": images}


CHUNK_KEYS = ("rewards", "discounted_return", "n_valid", "mask", "valid", "subgoal", "return_to_go")  # per chunk


@dataclass
class ChunkDataset:
    """One chunk transition per frame of every episode, as index arrays into `data` (M = N chunks)."""

    data: EpisodeData
    horizon: int
    gamma: float
    obs_idx: np.ndarray  # i64[M]
    next_obs_idx: np.ndarray  # i64[M], frame t+H clamped to the episode's last frame
    action_idx: np.ndarray  # i64[M, H], clamped: padded steps repeat the last action
    rewards: np.ndarray  # f32[M, H], 0 where not valid
    discounted_return: np.ndarray  # f32[M]
    valid: np.ndarray  # bool[M, H], step t+k inside the episode and not after a termination
    mask: np.ndarray  # f32[M], 0 iff a termination happens inside the chunk
    n_valid: np.ndarray  # i32[M], number of valid steps
    subgoal: np.ndarray  # bool[M], a subgoal flag in a valid step
    return_to_go: np.ndarray  # f32[M], discounted return from o_t to the episode's end (past a time limit: its tail)
    return_to_end: np.ndarray  # f32[M], sum_{t<=j<L} gamma^(j-t) r_j: the return within the episode, no tail
    end_obs_idx: np.ndarray  # i64[M], the episode's last stored frame o_{L-1}
    end_discount: np.ndarray  # f32[M], gamma^(L-t) if the episode ended at a time limit, else 0: the tail's weight

    @property
    def prompts(self) -> list[str]:
        return self.data.prompts

    def __len__(self) -> int:
        return len(self.obs_idx)

    def get(self, indices: np.ndarray, keys: tuple[str, ...] | None = None) -> Batch:
        """The batch of chunks `indices`, only its `keys` (None: all): what is not asked for is never gathered."""
        i = np.asarray(indices)
        batch = {k: getattr(self, k)[i] for k in CHUNK_KEYS}
        batch["actions"] = self.data.actions[self.action_idx[i]]
        if keys is None or "obs" in keys:
            batch["obs"] = gather_obs(self.data.obs, self.obs_idx[i])
        if keys is None or "next_obs" in keys:
            batch["next_obs"] = gather_obs(self.data.obs, self.next_obs_idx[i])
        return batch if keys is None else {k: batch[k] for k in keys}

    def sample(self, rng: np.random.Generator, batch_size: int, keys: tuple[str, ...] | None = None) -> Batch:
        """A uniformly sampled batch (with replacement) of the `keys` (None: all)."""
        return self.get(rng.integers(0, len(self), batch_size), keys)


def make_chunks(data: EpisodeData, horizon: int, gamma: float) -> ChunkDataset:
    """Cut every episode into chunk transitions, one per frame (see the module docstring for the rules)."""
    n, h = len(data), horizon
    episode = np.repeat(np.arange(len(data.episode_lengths)), data.episode_lengths)  # [N]
    start, length = data.episode_starts[episode], data.episode_lengths[episode]
    t = np.arange(n) - start  # position of each frame in its episode
    pos = t[:, None] + np.arange(h)  # [N, H]
    inside = pos < length[:, None]
    frame = start[:, None] + np.minimum(pos, length[:, None] - 1)  # [N, H], clamped
    term = data.terminals[frame] & inside
    # A step is valid if inside the episode and no termination happened at an earlier step of the chunk.
    after_term = np.cumsum(term, axis=1) - term > 0
    valid = inside & ~after_term
    rewards = np.where(valid, data.rewards[frame], 0.0).astype(np.float32)
    discounted = (rewards * gamma ** np.arange(h, dtype=np.float64)).sum(1).astype(np.float32)
    n_valid = valid.sum(1)
    terminal_any = (term & valid).any(1)
    # Return to go G_t = sum_{j>=t} gamma^(j-t) r_j within the episode, from suffix sums of gamma^pos * r (float64).
    scaled = data.rewards.astype(np.float64) * gamma ** t.astype(np.float64)
    suffix = np.r_[np.cumsum(scaled[::-1])[::-1], 0.0]  # suffix[i] = sum over frames >= i; suffix[n] = 0
    to_end = (suffix[:n] - suffix[start + length]) / gamma ** t.astype(np.float64)
    end_discount = np.where(data.truncated[episode], gamma ** (length - t).astype(np.float64), 0.0)
    togo = to_end.copy()
    if gamma < 1:  # a time limit is not the end of the task: the last reward repeats after it (0 for push's)
        togo += end_discount * data.rewards[start + length - 1].astype(np.float64) / (1 - gamma)
    return ChunkDataset(
        data=data,
        horizon=h,
        gamma=gamma,
        obs_idx=np.arange(n),
        next_obs_idx=start + np.minimum(t + h, length - 1),
        action_idx=frame,
        rewards=rewards,
        discounted_return=discounted,
        valid=valid,
        mask=(~terminal_any).astype(np.float32),
        n_valid=n_valid.astype(np.int32),
        subgoal=(data.subgoal[frame] & valid).any(1),
        return_to_go=togo.astype(np.float32),
        return_to_end=to_end.astype(np.float32),
        end_obs_idx=start + length - 1,
        end_discount=end_discount.astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------------- online
class ReplayBuffer:
    """Circular buffer of online chunk transitions: what a TD target reads of a chunk (`KEYS`) and the per-transition
    arrays a script caches when it acts (`extras`: e.g. o_t's features, the chunk, o_{t+H}'s features)."""

    KEYS = ("discounted_return", "n_valid", "mask")

    def __init__(self, capacity: int, horizon: int, gamma: float):
        self.capacity, self.horizon, self.gamma = capacity, horizon, gamma
        self.size, self._next = 0, 0
        self.discounted_return = np.zeros(capacity, np.float32)
        self.n_valid = np.zeros(capacity, np.int32)
        self.mask = np.zeros(capacity, np.float32)
        self.extras: dict[str, np.ndarray] = {}  # allocated at the first add, when their shapes are known

    def __len__(self) -> int:
        return self.size

    def add(self, step: Any, extras: dict[str, np.ndarray]) -> None:
        """Store the E chunks an `envs.ChunkStep` executed, with `extras` {name: [E, ...]}."""
        valid = np.asarray(step.valid, bool)
        e, h = valid.shape
        if h != self.horizon:
            raise ValueError(f"chunks of length {h}, the buffer was made for horizon {self.horizon}.")
        idx = (self._next + np.arange(e)) % self.capacity
        rewards = np.where(valid, step.rewards, 0.0)
        self.discounted_return[idx] = (rewards * self.gamma ** np.arange(h, dtype=np.float64)).sum(1)
        self.n_valid[idx] = valid.sum(1)
        self.mask[idx] = 1.0 - np.asarray(step.terminated, np.float32)
        for k, v in extras.items():
            v = np.asarray(v)
            if k not in self.extras:
                self.extras[k] = np.zeros((self.capacity, *v.shape[1:]), v.dtype)
            self.extras[k][idx] = v
        self._next = int((self._next + e) % self.capacity)
        self.size = min(self.size + e, self.capacity)

    def bytes_per_transition(self) -> int:
        """Host memory one stored chunk transition takes."""
        arrays = [getattr(self, k) for k in self.KEYS] + list(self.extras.values())
        return sum(v.nbytes // self.capacity for v in arrays)

    def state_dict(self) -> dict[str, Any]:
        """The stored transitions and the write position, for a checkpoint's host arrays."""
        n = self.size
        extras = {k: v[:n] for k, v in self.extras.items()}
        return {"next": np.asarray(self._next), **{k: getattr(self, k)[:n] for k in self.KEYS}, "extras": extras}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Fill this empty buffer from `state_dict`'s output."""
        n = len(saved["n_valid"])
        if n > self.capacity:
            raise DatasetError(
                f"the saved replay buffer holds {n} transitions, more than --buffer-size {self.capacity}"
            )
        for k in self.KEYS:
            getattr(self, k)[:n] = saved[k]
        for k, v in saved.get("extras", {}).items():
            self.extras[k] = np.zeros((self.capacity, *v.shape[1:]), v.dtype)
            self.extras[k][:n] = v
        self.size, self._next = n, int(saved["next"])
