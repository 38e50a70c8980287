"""Data for chunked RL: every dataset reader into one episode type (`EpisodeData`), chunk transitions with their
masks, the online replay buffer, offline/online mixing, and normalisation statistics.

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

import io
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
LEROBOT_IMAGE_SIZE = 128  # LeRobot images are read resized to this unless told (all of openpi's LIBERO at 256²: ~90 GB)


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
    `image_size`, 0: `LEROBOT_IMAGE_SIZE`), an OGBench/D4RL .npz file or a Minari folder. Prompt ids index the env's
    prompts first, then the data's new ones; the env's reward transform (`envs.ScaledReward`) applies to the data."""
    lerobot = is_lerobot(path)
    if lerobot:
        data = load_lerobot(path, prompts=env.prompts, image_size=image_size or LEROBOT_IMAGE_SIZE)
    elif str(path).endswith(".npz"):
        data = load_npz(path, getattr(env, "env_id", ""), prompts=env.prompts)
    elif is_minari(path):
        data = load_minari(path, prompts=env.prompts)
    else:
        data = load_episodes(path, prompts=env.prompts)  # refuses NaN / inf per file and demo as it reads
    if data.actions.shape[1] != env.action_dim:
        raise RunError(f"{path}: actions have {data.actions.shape[1]} dims, the environment's {env.action_dim}")
    if getattr(env, "state_dim", data.obs["state"].shape[1]) != data.obs["state"].shape[1]:
        raise RunError(
            f"{path}: observations have {data.obs['state'].shape[1]} dims, the environment's "
            f"{env.state_dim}: is it this env's dataset?"
        )
    if lerobot:
        refuse_non_finite(path, data)
    if (transform := getattr(env, "reward_transform", None)) is not None:  # the env's a·r + b, on the data too
        data.rewards = (transform[0] * data.rewards + transform[1]).astype(np.float32)
    return data


def dataset_instructions(path: str | os.PathLike) -> list[str]:
    """The distinct non-empty instructions of a dataset, from its metadata only (HDF5 attrs, LeRobot's
    `meta/tasks.jsonl`); [] for npz and Minari data."""
    p = Path(path)
    if is_lerobot(p):
        tasks = p / "meta" / "tasks.jsonl"
        lines = tasks.read_text().splitlines() if tasks.exists() else []
        return sorted({json.loads(line)["task"] for line in lines if line.strip()} - {""})
    files = sorted([*p.glob("*.hdf5"), *p.glob("*.h5")]) if p.is_dir() else [p]
    found: set[str] = set()
    for file in files:
        if not file.is_file() or not h5py.is_hdf5(file):
            continue
        with h5py.File(file, "r") as f:
            info = json.loads(f["data"].attrs.get("problem_info", "{}") or "{}") if "data" in f else {}
            found |= {demo_instruction(demo, info) for demo in f.get("data", {}).values()}
    return sorted(found - {""})


def dataset_image_size(path: str | os.PathLike) -> int | None:
    """The image height of an HDF5 dataset's first demo, `LEROBOT_IMAGE_SIZE` for a LeRobot folder, else None."""
    if is_lerobot(path):
        return LEROBOT_IMAGE_SIZE
    p = Path(path)
    files = sorted([*p.glob("*.hdf5"), *p.glob("*.h5")]) if p.is_dir() else [p]
    if not files or not h5py.is_hdf5(files[0]):
        return None
    try:
        with h5py.File(files[0], "r") as f:
            demos = sorted(f.get("data", {}))
            obs = f["data"][demos[0]].get("obs", {}) if demos else {}
            shapes = [obs[k].shape for k in obs if obs[k].dtype == np.uint8 and obs[k].ndim == 4]
    except OSError:  # a truncated file: `load_episodes` says so when it reads it
        return None
    return int(shapes[0][1]) if shapes else None


def _dataset_files(paths: str | Path | list) -> list[Path]:
    files: list[Path] = []
    for p in [paths] if isinstance(paths, str | Path) else paths:
        p = Path(p)
        if p.is_dir():
            found = sorted([*p.glob("*.hdf5"), *p.glob("*.h5")])
            if not found:
                raise DatasetError(f"{p}: directory holds no .hdf5/.h5 files; point to a dataset file or folder.")
            files += found
        elif not p.exists():
            raise DatasetError(
                f"{p}: no such file; check the path, or write one with `python -m common.envs make-dataset`."
            )
        else:
            files.append(p)
    return files


def _open(path: Path) -> h5py.File:
    """`h5py.File(path, "r")`, or a DatasetError naming the file when it is empty, truncated or not HDF5."""
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(
            f"{path}: not a readable HDF5 file ({e}); is it empty, truncated or still being written? "
            "Write it again (python -m common.envs make-dataset for push)"
        ) from None


def _demo_names(data: h5py.Group) -> list[str]:
    return sorted(data.keys(), key=lambda k: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", k)])


def _camera_name(key: str) -> str:
    return LIBERO_CAMERAS.get(key, key)


def demo_instruction(demo: h5py.Group, info: dict[str, Any]) -> str:
    """A demo's attr `language_instruction`, else the file's `problem_info["language_instruction"]`, else ""."""
    lang = demo.attrs.get("language_instruction", info.get("language_instruction", ""))
    return lang.decode() if isinstance(lang, bytes) else str(lang)


def load_episodes(
    paths: str | Path | list[str | Path],
    prompts: list[str] | None = None,
    image_keys: list[str] | None = None,
    max_episodes: int | None = None,
    min_length: int = 1,
) -> EpisodeData:
    """Episodes of robomimic/LIBERO-layout HDF5 files (a file, a list, or a folder of .hdf5/.h5 files).

    Per demo `data/demo_<i>`: `actions`, `rewards`, `dones` (as given), `obs/<key>`. State: `obs/state`, else
    `LIBERO_STATE_KEYS`. Images: every uint8 obs [T, h, w, 3] (or `image_keys`, file keys or camera names), LIBERO's
    renamed by `LIBERO_CAMERAS` and rotated 180°. Instructions (`demo_instruction`) index `prompts`, new ones
    appended (first `problem_info["prompts"]`). Attr `truncated` and `obs/subgoal` default to False.
    """
    prompts = list(prompts or [])
    files = _dataset_files(paths)
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
                    if max_episodes is not None and len(plan) >= max_episodes:
                        break
                    g = f["data"][name]
                    here = _demo_layout(path, name, g, image_keys)
                    if layout is None:
                        layout = here
                    elif here != layout:
                        raise DatasetError(
                            f"{path}:{name}: observation layout {here} differs from the first demo's {layout}."
                        )
                    length = len(g["actions"])
                    if length < min_length:
                        raise DatasetError(
                            f"{path}:{name}: episode of length {length} is shorter than min_length={min_length}; "
                            "drop it from the file or lower min_length."
                        )
                    lang = demo_instruction(g, info)
                    plan.append((path, name, length, lang, bool(g.attrs.get("truncated", False))))
        except OSError as e:  # a truncated file: h5py opens it, reading its index fails
            raise DatasetError(f"{path}: unreadable ({e}); the file looks truncated or still being written") from None
    if not plan or layout is None:
        raise DatasetError(f"{files}: no episodes found under data/.")
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


def _demo_layout(path: Path, name: str, g: h5py.Group, image_keys: list[str] | None) -> dict[str, Any]:
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
            f"it has {sorted(o.keys())}. "
            "Store the proprioceptive state as obs/state."
        )
    found = {k: o[k] for k in o if o[k].dtype == np.uint8 and o[k].ndim == 4 and o[k].shape[-1] == 3}
    if image_keys is not None:  # file keys or camera names
        keys = [k if k in found else next((f for f in found if _camera_name(f) == k), None) for k in image_keys]
        if None in keys:
            unknown = [k for k, f in zip(image_keys, keys, strict=True) if f is None]
            raise DatasetError(f"{where}/obs: image keys {unknown} not found; image keys present: {sorted(found)}.")
        found = {k: found[k] for k in keys}
    images = {_camera_name(k): (k, tuple(v.shape[1:])) for k, v in found.items()}
    return {"state_dim": state_dim, "action_dim": int(np.prod(g["actions"].shape[1:])), "images": images}


def is_lerobot(path: str | os.PathLike) -> bool:
    """A LeRobot dataset folder (`meta/tasks.jsonl` or `data/**/*.parquet`), e.g. openpi's LIBERO data."""
    p = Path(path)
    return p.is_dir() and ((p / "meta" / "tasks.jsonl").exists() or any(p.glob("data/**/*.parquet")))


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
) -> EpisodeData:
    """A LeRobot dataset (`data/**/*.parquet`, `meta/tasks.jsonl`): columns `state`, `actions`, `episode_index`,
    `frame_index`, `task_index` and the image columns `image_keys` maps to cameras (default openpi's LIBERO; {}:
    none), kept upright and resized to `image_size`² when given. Rewards and terminations from `next.reward` /
    `next.done`, else a demo's last frame is a success (as LIBERO's HDF5 demos). Prompts: `prompts`, then the
    tasks not in it (without `prompts`, prompt_id = task_index)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError('load_lerobot needs pyarrow: pip install -e ".[libero]"') from err
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
            "OGBench's generator or `python -m common.envs make-dataset`"
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


def is_minari(path: str | os.PathLike) -> bool:
    """A Minari dataset folder (holding `data/main_data.hdf5` or `data/metadata.json`)."""
    p = Path(path)
    return (p / "data" / "metadata.json").exists() or (p / "metadata.json").exists() and (p / "main_data.hdf5").exists()


def load_minari(path: str | os.PathLike, prompts: list[str]) -> EpisodeData:
    """Episodes of a Minari dataset folder, Box observations only (each episode's extra last frame dropped)."""
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


# ----------------------------------------------------------------------------------------------------- chunks
def compute_norm_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """{"mean", "std", "q01", "q99"} float32 [D] over all leading axes of x[..., D] (openpi's norm_stats.json)."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    stats = {"mean": x.mean(0), "std": x.std(0), "q01": q01, "q99": q99}
    return {k: np.asarray(v, np.float32) for k, v in stats.items()}


def norm_stats(data: EpisodeData) -> dict[str, dict[str, np.ndarray]]:
    """{"state": stats, "actions": stats} of a dataset (`compute_norm_stats`; `pi0.normalize`'s layout)."""
    pairs = (("state", data.obs["state"]), ("actions", data.actions))
    return {k: compute_norm_stats(x) for k, x in pairs}


def gather_obs(obs: dict[str, Any], idx: np.ndarray) -> dict[str, Any]:
    """Rows `idx` of a frame-major observation dict ({"state", "prompt_id", "images"}, e.g. `EpisodeData.obs`)."""
    images = {k: v[idx] for k, v in obs["images"].items()}
    return {"state": obs["state"][idx], "prompt_id": obs["prompt_id"][idx], "images": images}


CHUNK_KEYS = ("rewards", "discounted_return", "n_valid", "mask", "valid", "subgoal", "return_to_go")  # per chunk


def _batch(src: Any, i: np.ndarray, obs: dict | None, actions: np.ndarray, next_obs: dict | None) -> Batch:
    """Rows `i` of `src`'s `CHUNK_KEYS`, with the gathered obs and actions."""
    batch = {k: getattr(src, k)[i] for k in CHUNK_KEYS}
    batch["actions"] = actions
    batch.update({k: v for k, v in (("obs", obs), ("next_obs", next_obs)) if v is not None})
    return batch


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
        i, frames, want = np.asarray(indices), self.data.obs, lambda k: keys is None or k in keys
        obs = gather_obs(frames, self.obs_idx[i]) if want("obs") else None
        next_obs = gather_obs(frames, self.next_obs_idx[i]) if want("next_obs") else None
        batch = _batch(self, i, obs, self.data.actions[self.action_idx[i]], next_obs)
        return batch if keys is None else {k: batch[k] for k in keys}

    def sample(self, rng: np.random.Generator, batch_size: int, keys: tuple[str, ...] | None = None) -> Batch:
        """A uniformly sampled batch (with replacement) of the `keys` (None: all)."""
        return self.get(rng.integers(0, len(self), batch_size), keys)

    def all_indices(self, batch_size: int):
        """Yield index arrays covering every chunk once, in order (the last one may be shorter)."""
        for lo in range(0, len(self), batch_size):
            yield np.arange(lo, min(lo + batch_size, len(self)))


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


def return_units(chunks: ChunkDataset | None) -> tuple[float, float]:
    """(μ, σ): the mean and std of the chunks' Monte Carlo returns from o_t, for values learned in critic units,
    (return − μ) / σ, at any reward scale; (0, 1) without chunks (values in reward units)."""
    if chunks is None or len(chunks) == 0:
        return 0.0, 1.0
    return float(chunks.return_to_go.mean()), float(chunks.return_to_go.std()) or 1.0


# ----------------------------------------------------------------------------------------------------- online
class MixedBatches:
    """RLPD's symmetric sampling of cached arrays: `online_fraction` of each batch from a `ReplayBuffer` (its fields
    `keys` and its `extras`) once it holds anything, the rest from the prior data `offline` (None: every row from the
    buffer): its `keys` and arrays cached per chunk (`at_chunk` {name: [C,...]}) or per frame, read at each chunk's
    o_t (`at_obs` {name: [F,...]}) or o_{t+H} (`at_next`), under the buffer's extras' names. Offline rows come first."""

    def __init__(
        self, buffer, keys: tuple, offline=None, online_fraction=0.5, at_chunk=None, at_obs=None, at_next=None
    ):
        self.buffer, self.keys, self.offline, self.online_fraction = buffer, keys, offline, online_fraction
        self.at_chunk, self.at_obs, self.at_next = at_chunk or {}, at_obs or {}, at_next or {}

    def rows(self, i: np.ndarray) -> Batch:
        """The prior data's rows of chunks `i`."""
        o, nxt = self.offline.obs_idx[i], self.offline.next_obs_idx[i]
        out = {k: getattr(self.offline, k)[i] for k in self.keys}
        out.update({k: v[i] for k, v in self.at_chunk.items()}, **{k: v[o] for k, v in self.at_obs.items()})
        return {**out, **{k: v[nxt] for k, v in self.at_next.items()}}

    def sample(self, rng: np.random.Generator, n: int) -> Batch:
        b = self.buffer
        online = {**{k: getattr(b, k) for k in self.keys}, **b.extras}
        if self.offline is None:
            return {k: v[rng.integers(0, len(b), n)] for k, v in online.items()}
        n_on = int(round(n * self.online_fraction)) if len(b) else 0
        i = rng.integers(0, len(self.offline), n - n_on)
        j = rng.integers(0, len(b) or 1, n_on)
        out = self.rows(i)
        if n_on:
            out = {k: np.concatenate([v, online[k][j]]) for k, v in out.items()}
        return out


class ReplayBuffer:
    """Circular buffer of online chunk transitions, sampled in `ChunkDataset`'s batch form.

    `obs_example`: one observation (batched or not: only trailing shapes are used); None: no observations are stored
    (what a script cached at acting time goes in `extras`). `td_only`: keep only what a TD target reads of a chunk
    (`discounted_return`, `n_valid`, `mask`).
    """

    def __init__(
        self,
        capacity: int,
        horizon: int,
        gamma: float,
        obs_example: dict[str, Any] | None = None,
        td_only: bool = False,
    ):
        self.capacity, self.horizon, self.gamma, self.td_only = capacity, horizon, gamma, td_only
        self.size, self._next = 0, 0

        def obs_storage() -> dict[str, Any] | None:
            if obs_example is None:
                return None
            images = {k: np.shape(v)[-3:] for k, v in obs_example.get("images", {}).items()}
            return {
                "state": np.zeros((capacity, np.shape(obs_example["state"])[-1]), np.float32),
                "prompt_id": np.zeros(capacity, np.int32),
                "images": {k: np.zeros((capacity, *s), np.uint8) for k, s in images.items()},
            }

        self.obs, self.next_obs = obs_storage(), obs_storage()
        self.actions: np.ndarray | None = None  # allocated at the first add, when A is known
        per_step = (lambda dtype: None) if td_only else (lambda dtype: np.zeros((capacity, horizon), dtype))
        self.rewards, self.valid = per_step(np.float32), per_step(bool)
        self.discounted_return = np.zeros(capacity, np.float32)
        self.n_valid = np.zeros(capacity, np.int32)
        self.mask = np.zeros(capacity, np.float32)
        self.subgoal = None if td_only else np.zeros(capacity, bool)
        self.return_to_go = None if td_only else np.full(capacity, np.nan, np.float32)
        self.extras: dict[str, np.ndarray] = {}  # per-transition arrays a script caches (e.g. encoded features)

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        obs: dict[str, Any],
        actions: np.ndarray,
        step: Any,
        next_obs: dict[str, Any] | None = None,
        extras: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Store E chunk transitions: obs at the chunk start, actions [E, H, A], the `envs.ChunkStep`, and `extras`
        {name: [E, ...]} kept alongside (saved and loaded with the rest)."""
        e, h = actions.shape[:2]
        if h != self.horizon:
            raise ValueError(f"actions have chunk length {h}, the buffer was made for horizon {self.horizon}.")
        if self.actions is None and not self.td_only:
            self.actions = np.zeros((self.capacity, h, actions.shape[-1]), np.float32)
        next_obs = step.final_obs if next_obs is None else next_obs
        idx = (self._next + np.arange(e)) % self.capacity
        if self.obs is not None:
            for store, src in ((self.obs, obs), (self.next_obs, next_obs)):
                store["state"][idx] = src["state"]
                store["prompt_id"][idx] = src["prompt_id"]
                for k, v in store["images"].items():
                    v[idx] = src["images"][k]
        valid = np.asarray(step.valid, bool)
        rewards = np.where(valid, step.rewards, 0.0)
        self.discounted_return[idx] = (rewards * self.gamma ** np.arange(h, dtype=np.float64)).sum(1)
        self.n_valid[idx] = valid.sum(1)
        self.mask[idx] = 1.0 - np.asarray(step.terminated, np.float32)
        if not self.td_only:
            self.actions[idx] = actions
            self.rewards[idx] = rewards
            self.valid[idx] = valid
            self.subgoal[idx] = (np.asarray(step.subgoal, bool) & valid).any(1)
        for k, v in (extras or {}).items():
            v = np.asarray(v)
            if k not in self.extras:
                self.extras[k] = np.zeros((self.capacity, *v.shape[1:]), v.dtype)
            self.extras[k][idx] = v
        self._next = int((self._next + e) % self.capacity)
        self.size = min(self.size + e, self.capacity)

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """A uniformly sampled batch (with replacement); obs only when they are stored."""
        if self.size == 0:
            raise ValueError("the replay buffer is empty; add transitions before sampling.")
        if self.td_only:
            raise ValueError("a td_only buffer keeps no chunks to sample as a Batch; read its arrays and extras")
        i = rng.integers(0, self.size, batch_size)
        if self.obs is None:
            return _batch(self, i, None, self.actions[i], None)
        return _batch(self, i, gather_obs(self.obs, i), self.actions[i], gather_obs(self.next_obs, i))

    _SAVED = ("obs", "next_obs", "actions", "rewards", "valid", "discounted_return", "n_valid", "mask", "subgoal")

    def _arrays(self) -> dict[str, np.ndarray]:
        """The stored arrays by flat name ("obs/state", "obs/images/base_0_rgb", "rewards", ...)."""
        out: dict[str, np.ndarray] = {}
        for k in self._SAVED:
            v = getattr(self, k)
            if v is None:
                continue
            if k in ("obs", "next_obs"):
                out.update({f"{k}/{n}": v[n] for n in ("state", "prompt_id")})
                out.update({f"{k}/images/{c}": img for c, img in v["images"].items()})
            else:
                out[k] = v
        out.update({f"extras/{k}": v for k, v in self.extras.items()})
        return out

    def bytes_per_transition(self) -> int:
        """Host memory one stored chunk transition takes (allocated arrays and extras)."""
        return sum(v.nbytes // self.capacity for v in self._arrays().values()) + (
            0 if self.return_to_go is None else self.return_to_go.itemsize
        )

    def state_dict(self) -> dict[str, Any]:
        """The stored transitions and the write position, for a checkpoint's host arrays (not `return_to_go`: NaN)."""
        return {"next": np.asarray(self._next), **{k: v[: self.size] for k, v in self._arrays().items()}}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Fill this empty, same-shaped buffer from `state_dict`'s output (flat or nested, as a checkpoint gives it)."""
        flat = _flat(saved)
        n = len(flat.get("n_valid", ()))
        if n == 0:  # saved empty
            return
        if n > self.capacity:
            raise DatasetError(
                f"the saved replay buffer holds {n} transitions, more than --buffer-size {self.capacity}"
            )
        if "actions" in flat:
            self.actions = np.zeros((self.capacity, *flat["actions"].shape[1:]), np.float32)
        for k in (f for f in flat if f.startswith("extras/")):
            self.extras[k[7:]] = np.zeros((self.capacity, *flat[k].shape[1:]), flat[k].dtype)
        for k, v in self._arrays().items():
            v[:n] = flat[k]
        self.size, self._next = n, int(flat["next"])


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
