"""common/data.py: chunk transitions on hand-made episodes, the readers (HDF5 in push and LIBERO layouts, OGBench's
npz, Minari, LeRobot), buffers, norm stats."""

import io
import json
import os
import types

import gymnasium as gym
import h5py
import numpy as np
import pytest

from common import envs, runlog
from common.data import (
    DatasetError,
    ReplayBuffer,
    gather_obs,
    is_lerobot,
    is_minari,
    load_dataset,
    load_episodes,
    make_chunks,
    norm_stats,
)
from common.envs import PUSH_PROMPTS, ChunkStep, make_dataset
from common.gymenv import load_npz
from common.libero import dataset_image_size
from common.openpi import LEROBOT_IMAGE_SIZE, load_lerobot

G = 0.9


def write_demos(path, episodes: list[dict], language: str = "do it") -> str:
    """Tiny push-layout file; obs state and actions of global frame i are [i, i] so gathers can be checked."""
    frame = 0
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": language})
        for i, ep in enumerate(episodes):
            n = len(ep["rewards"])
            g = data.create_group(f"demo_{i}")
            ids = np.arange(frame, frame + n, dtype=np.float32)[:, None].repeat(2, 1)
            g["actions"], g["obs/state"] = ids, ids
            g["rewards"], g["dones"] = np.array(ep["rewards"], np.float32), np.array(ep["dones"], np.uint8)
            if "subgoal" in ep:
                g["obs/subgoal"] = np.array(ep["subgoal"], np.uint8)
            g.attrs["truncated"] = ep.get("truncated", False)
            if "lang" in ep:
                g.attrs["language_instruction"] = ep["lang"]
            frame += n
    return str(path)


EPISODES = [
    {"rewards": [0, 0, 0, 0, 1], "dones": [0, 0, 0, 0, 1], "subgoal": [0, 0, 1, 0, 0]},  # terminates, frames 0-4
    {"rewards": [0, 0.5, 0, 0], "dones": [0, 0, 0, 0], "truncated": True, "lang": "other"},  # time limit, frames 5-8
    {"rewards": [0, 0], "dones": [0, 1]},  # shorter than H, frames 9-10
]


@pytest.fixture
def chunks(tmp_path):
    data = load_episodes(write_demos(tmp_path / "d.h5", EPISODES), prompts=["x"])
    return make_chunks(data, horizon=3, gamma=G)


def test_episode_storage(chunks) -> None:
    d = chunks.data
    assert d.episode_starts.tolist() == [0, 5, 9] and d.episode_lengths.tolist() == [5, 4, 2]
    assert d.truncated.tolist() == [False, True, False] and d.terminals.nonzero()[0].tolist() == [4, 10]
    assert d.prompts == ["x", "do it", "other"] and d.obs["prompt_id"].tolist() == [1] * 5 + [2] * 4 + [1] * 2
    assert d.subgoal.nonzero()[0].tolist() == [2] and len(chunks) == 11


@pytest.mark.parametrize(
    "t, valid, rewards, ret, mask, nxt, act",
    [
        (0, [1, 1, 1], [0, 0, 0], 0.0, 1, 3, [0, 1, 2]),  # inside the episode
        (2, [1, 1, 1], [0, 0, 1], G**2, 0, 4, [2, 3, 4]),  # ends exactly at the termination
        (3, [1, 1, 0], [0, 1, 0], G, 0, 4, [3, 4, 4]),  # crosses the termination: padded, masked
        (6, [1, 1, 1], [0.5, 0, 0], 0.5, 1, 8, [6, 7, 8]),  # ends at the truncation: keeps bootstrapping
        (7, [1, 1, 0], [0, 0, 0], 0.0, 1, 8, [7, 8, 8]),  # crosses the truncation: bootstrap from last frame
        (9, [1, 1, 0], [0, 0, 0], 0.0, 0, 10, [9, 10, 10]),  # H longer than the episode
    ],
)
def test_chunk_targets(chunks, t, valid, rewards, ret, mask, nxt, act) -> None:
    b = chunks.get(np.array([t]))
    assert b["valid"][0].tolist() == [bool(v) for v in valid]
    np.testing.assert_allclose(b["rewards"][0], rewards)
    np.testing.assert_allclose(b["discounted_return"][0], ret, rtol=1e-6)
    assert b["mask"][0] == mask
    assert b["n_valid"][0] == sum(valid)  # the TD target discounts its bootstrap by gamma ** n_valid
    assert b["obs"]["state"][0, 0] == t and b["next_obs"]["state"][0, 0] == nxt
    assert b["actions"][0, :, 0].tolist() == act
    assert b["subgoal"][0] == (t in (0, 1, 2))


def test_return_to_go(chunks) -> None:  # Monte Carlo return from each frame to its episode's end
    want = [G**4, G**3, G**2, G, 1.0, 0.5 * G, 0.5, 0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(chunks.return_to_go, want, rtol=1e-6)
    np.testing.assert_allclose(chunks.get(np.array([1, 6]))["return_to_go"], [G**3, 0.5], rtol=1e-6)


def test_return_to_go_past_a_time_limit(tmp_path) -> None:
    """A truncated episode's last reward repeats past its time limit: with −1 per step (OGBench), every frame of a
    failed episode is worth −1/(1−γ), not the few steps the time limit left; a terminated episode stops at its end."""
    eps = [{"rewards": [-1, -1], "dones": [0, 0], "truncated": True}, {"rewards": [-1, 0], "dones": [0, 1]}]
    togo = make_chunks(load_episodes(write_demos(tmp_path / "d.h5", eps)), horizon=1, gamma=G).return_to_go
    np.testing.assert_allclose(togo, [-1 / (1 - G), -1 / (1 - G), -1.0, 0.0], rtol=1e-6)


def test_return_to_end_and_the_tail_of_a_truncated_episode(tmp_path) -> None:
    """return_to_go = return_to_end + end_discount · r_{L−1} / (1 − γ): the return within the episode, and the tail
    a script may replace by a value of the episode's last frame (end_obs_idx), γ^(L−t) ahead; none after a success."""
    eps = [{"rewards": [-1, -1, -1], "dones": [0, 0, 0], "truncated": True}, {"rewards": [-1, 0], "dones": [0, 1]}]
    c = make_chunks(load_episodes(write_demos(tmp_path / "d.h5", eps)), horizon=2, gamma=G)
    np.testing.assert_allclose(c.return_to_end, [-1 - G - G**2, -1 - G, -1.0, -1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(c.end_discount, [G**3, G**2, G, 0.0, 0.0], rtol=1e-6)
    assert c.end_obs_idx.tolist() == [2, 2, 2, 4, 4]
    np.testing.assert_allclose(c.return_to_go, c.return_to_end - c.end_discount / (1 - G), rtol=1e-6)


def test_termination_mid_episode_invalidates_later_steps(tmp_path) -> None:
    path = write_demos(tmp_path / "m.h5", [{"rewards": [0, 1, 5, 5], "dones": [0, 1, 0, 0]}])
    c = make_chunks(load_episodes(path), horizon=4, gamma=G)
    assert c.valid[0].tolist() == [True, True, False, False] and c.discounted_return[0] == pytest.approx(G)


def test_sample_shapes(chunks) -> None:
    b = chunks.sample(np.random.default_rng(0), 64)
    assert b["actions"].shape == (64, 3, 2) and b["obs"]["state"].shape == (64, 2) and b["valid"].shape == (64, 3)
    np.testing.assert_array_equal(b["actions"][:, 0], b["obs"]["state"])  # actions belong to their observation
    only = chunks.sample(np.random.default_rng(0), 8, ("actions", "mask"))  # what is not asked for is not gathered
    assert set(only) == {"actions", "mask"} and only["actions"].shape == (8, 3, 2)


def test_push_round_trip(tmp_path) -> None:
    path = make_dataset(tmp_path / "p.h5", episodes=12, noise=1.0, seed=3, image_size=32)
    data = load_episodes(path, prompts=PUSH_PROMPTS)
    assert data.prompts == PUSH_PROMPTS and data.obs["state"].shape[1] == 10
    assert data.obs["images"]["base_0_rgb"].shape == (len(data), 32, 32, 3)
    with h5py.File(path) as f:
        demos = [f[f"data/demo_{i}"] for i in range(12)]
        assert data.episode_lengths.tolist() == [g.attrs["num_samples"] for g in demos]
        assert data.truncated.tolist() == [bool(g.attrs["truncated"]) for g in demos]
        prompts = [PUSH_PROMPTS.index(g.attrs["language_instruction"]) for g in demos]
        np.testing.assert_array_equal(data.obs["state"][: len(demos[0]["actions"])], demos[0]["obs/state"])
    assert data.obs["prompt_id"][data.episode_starts].tolist() == prompts
    ends = data.episode_starts + data.episode_lengths - 1
    assert data.terminals.sum() == data.terminals[ends].sum() == (~data.truncated).sum()
    assert (data.episode_lengths[data.truncated] == 80).all() and data.truncated.any() and (~data.truncated).any()
    assert load_episodes(tmp_path).prompts == PUSH_PROMPTS  # the writer's prompt order is kept without `prompts`


def test_libero_layout(tmp_path) -> None:
    t = 3
    img = np.arange(t * 4 * 6 * 3, dtype=np.uint8).reshape(t, 4, 6, 3)
    with h5py.File(tmp_path / "libero.hdf5", "w") as f:
        f.create_group("data").attrs["problem_info"] = json.dumps({"language_instruction": "open the drawer"})
        g = f.create_group("data/demo_0")
        g["actions"], g["rewards"], g["dones"] = np.ones((t, 7)), np.array([0, 0, 1.0]), np.array([0, 0, 1])
        g["obs/ee_pos"], g["obs/ee_ori"], g["obs/gripper_states"] = (
            np.ones((t, 3)),
            2 * np.ones((t, 3)),
            np.zeros((t, 2)),
        )
        g["obs/joint_states"] = np.ones((t, 7))
        g["obs/agentview_rgb"], g["obs/eye_in_hand_rgb"] = img, img + 1
    data = load_episodes(tmp_path)
    assert data.prompts == ["open the drawer"] and data.actions.shape == (3, 7)
    np.testing.assert_array_equal(data.obs["state"][0], [1, 1, 1, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(data.obs["images"]["base_0_rgb"], img[:, ::-1, ::-1])
    np.testing.assert_array_equal(data.obs["images"]["left_wrist_0_rgb"], (img + 1)[:, ::-1, ::-1])


def test_bad_inputs(tmp_path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_episodes(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["other"] = np.zeros(3)
    with pytest.raises(DatasetError, match="no 'data' group.*other"):
        load_episodes(tmp_path / "empty.h5")
    with h5py.File(tmp_path / "keys.h5", "w") as f:
        f["data/demo_0/rewards"], f["data/demo_0/obs/state"] = np.zeros(3), np.zeros((3, 2))
    with pytest.raises(DatasetError, match=r"missing \['actions', 'dones'\]; it has \['obs', 'rewards'\]"):
        load_episodes(tmp_path / "keys.h5")
    with h5py.File(tmp_path / "obs.h5", "w") as f:
        f["data/demo_0/actions"], f["data/demo_0/rewards"], f["data/demo_0/dones"] = np.zeros((3, 2)), [0] * 3, [0] * 3
        f["data/demo_0/obs/joint_states"] = np.zeros((3, 7))
    with pytest.raises(DatasetError, match="joint_states"):
        load_episodes(tmp_path / "obs.h5")
    with pytest.raises(DatasetError, match="an episode without steps"):
        load_episodes(write_demos(tmp_path / "short.h5", [*EPISODES, {"rewards": [], "dones": []}]))


def chunk_step(rewards, valid, terminated) -> ChunkStep:
    e, h = np.shape(rewards)
    obs = {"state": np.full((e, 2), 7.0, np.float32), "prompt_id": np.zeros(e, np.int32), "images": {}}
    z = np.zeros(e, bool)
    return ChunkStep(
        rewards=np.array(rewards, np.float32),
        discounted_return=np.zeros(e, np.float32),
        valid=np.array(valid, bool),
        terminated=np.array(terminated, bool),
        truncated=z,
        step_terminated=np.zeros((e, h), bool),
        step_truncated=np.zeros((e, h), bool),
        success=z,
        final_obs=obs,
    )


def test_replay_buffer() -> None:
    """What a TD target reads of each chunk and the arrays a script cached when it acted (`extras`), wrapping around."""
    buf = ReplayBuffer(capacity=4, horizon=3, gamma=G)
    step = chunk_step([[0, 0, 1], [1, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 0, 0], [1, 1, 1]], [True, True, False])
    buf.add(step, {"z": np.ones((3, 5), np.float32)})
    np.testing.assert_allclose(buf.discounted_return[:3], [G**2, 1, 0], rtol=1e-6)
    assert buf.n_valid[:3].tolist() == [3, 1, 3]
    assert buf.mask[:3].tolist() == [0, 0, 1]
    buf.add(step, {"z": np.full((3, 5), 2, np.float32)})  # wraps around: capacity 4
    assert len(buf) == 4 and buf.extras["z"][:, 0].tolist() == [2, 2, 1, 2]
    with pytest.raises(ValueError, match="horizon 3"):
        buf.add(chunk_step(np.zeros((1, 2)), np.ones((1, 2)), [False]), {})


def test_norm_stats_values() -> None:
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(1000, 3)).astype(np.float32)
    x[:, 2] = 1.0  # constant dimension
    stats = norm_stats(types.SimpleNamespace(obs={"state": x}, actions=x))["state"]
    assert set(stats) == {"mean", "std", "q01", "q99"} and all(v.dtype == np.float32 for v in stats.values())
    np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["std"], x.std(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["q01"], np.quantile(x, 0.01, axis=0), rtol=1e-5)
    assert stats["std"][2] == 0.0 and stats["q99"][2] == 1.0


def test_norm_stats_of_a_dataset_and_gather_obs(chunks) -> None:
    data = chunks.data
    stats = norm_stats(data)
    for key, x in (("state", data.obs["state"]), ("actions", data.actions)):
        assert set(stats[key]) == {"mean", "std", "q01", "q99"} and stats[key]["mean"].dtype == np.float32
        np.testing.assert_allclose(stats[key]["mean"], x.mean(0), rtol=1e-6)
        np.testing.assert_allclose(stats[key]["q99"], np.quantile(x, 0.99, axis=0), rtol=1e-6)
    rows = gather_obs(data.obs, np.array([4, 1]))
    assert rows["state"][:, 0].tolist() == [4, 1] and rows["prompt_id"].shape == (2,) and rows["images"] == {}


def test_replay_buffer_state_round_trip() -> None:
    rng = np.random.default_rng(0)
    through_a_file = lambda d: runlog._unflatten(runlog._flatten(d))  # as a checkpoint's host file gives it back
    buf = ReplayBuffer(capacity=5, horizon=3, gamma=G)
    empty = ReplayBuffer(capacity=5, horizon=3, gamma=G)
    empty.load_state_dict(through_a_file(buf.state_dict()))
    assert len(empty) == 0 and empty.extras == {}  # an empty buffer comes back empty
    for _ in range(2):  # 6 transitions into 5 slots: the buffer wraps around
        step = chunk_step(rng.uniform(size=(3, 3)), [[1, 1, 1], [1, 1, 0], [1, 0, 0]], [False, True, False])
        extras = {"head": rng.normal(size=(3, 4)).astype(np.float32), "cand": rng.normal(size=(3, 2, 3, 2))}
        buf.add(step, extras)
    saved = buf.state_dict()
    back = ReplayBuffer(capacity=5, horizon=3, gamma=G)
    back.load_state_dict(through_a_file(saved))
    assert (len(back), back._next) == (len(buf), buf._next) == (5, 1)
    for k in ReplayBuffer.KEYS:
        np.testing.assert_array_equal(getattr(back, k), getattr(buf, k))
    np.testing.assert_equal(back.extras, buf.extras)  # cached per-transition arrays come back too
    assert buf.extras["head"].shape == (5, 4) and buf.extras["cand"].dtype == np.float64
    # the layout (a checkpoint's host file, buffer/...): the stored rows only
    assert sorted(saved) == ["discounted_return", "extras", "mask", "n_valid", "next"]
    assert sorted(saved["extras"]) == ["cand", "head"] and saved["extras"]["cand"].shape == (5, 2, 3, 2)
    small = ReplayBuffer(capacity=4, horizon=3, gamma=G)
    with pytest.raises(ValueError, match="more than --buffer-size 4"):
        small.load_state_dict(saved)


def test_replay_buffer_bytes() -> None:
    """acrlpd_pi0.py's buffer at the full π₀'s LIBERO sizes (width 2048, state padded to 32, H=10, A=7, --target-n 8):
    the TD arrays and the critic's cache, 19,172 bytes a chunk (docs/results/libero.md)."""
    E, H, A, Z, N = 2, 10, 7, 2048 + 32, 8
    extras = {
        "obs_z": np.zeros((E, Z), np.float32),
        "chunk": np.zeros((E, H, A), np.float32),
        "next_obs_z": np.zeros((E, Z), np.float32),
        "next_cand": np.zeros((E, N, H, A), np.float32),
    }
    buf = ReplayBuffer(capacity=8, horizon=H, gamma=G)
    buf.add(chunk_step(np.zeros((E, H)), np.ones((E, H)), [False, True]), extras)
    assert buf.bytes_per_transition() == 19_172


def _ogbench_layout(path: str, rewards: bool = False) -> None:
    """Two trajectories in OGBench's npz layout: `terminals` ends each (lengths 4 and 3)."""
    rng = np.random.default_rng(0)
    data = dict(
        observations=rng.normal(size=(7, 3)).astype(np.float32),
        actions=rng.normal(size=(7, 1)),
        terminals=np.array([0, 0, 0, 1, 0, 0, 1], bool),
    )
    if rewards:  # a termination at frame 1 of the first trajectory (masks 0): the rest is a new episode
        data.update(rewards=np.array([-1, 0, -1, -1, -1, -1, -1], np.float32), masks=np.array([1, 0, 1, 1, 1, 1, 1]))
    np.savez(path, **data)


def test_npz_reader(tmp_path: object) -> None:
    path = os.path.join(tmp_path, "d.npz")
    _ogbench_layout(path, rewards=True)
    data = load_npz(path, "Pendulum-v1", [""])
    assert data.episode_lengths.tolist() == [2, 2, 3] and data.episode_starts.tolist() == [0, 2, 4]
    assert data.terminals.tolist() == [False, True] + [False] * 5 and data.truncated.tolist() == [False, True, True]
    assert data.obs["state"].shape == (7, 3) and data.prompts == [""] and (data.obs["prompt_id"] == 0).all()
    _ogbench_layout(path)  # no rewards: only an OGBench single-task env can relabel them
    with pytest.raises(DatasetError, match="not an OGBench single-task env"):
        load_npz(path, "Pendulum-v1", [""])
    bad = dict(np.load(path), rewards=np.array([-1, 0, -1, -1, -1, -1, -1], np.float32))
    bad["actions"][5, 0] = np.nan
    np.savez(path, **bad)
    with pytest.raises(DatasetError, match="episode 1 has NaN or inf in actions \\(frame 5\\)"):
        load_npz(path, "Pendulum-v1", [""])
    np.savez(path, observations=np.zeros((3, 2)))
    with pytest.raises(DatasetError, match="no actions, terminals"):
        load_npz(path, "Pendulum-v1", [""])
    open(path, "wb").write(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable npz"):
        load_npz(path, "Pendulum-v1", [""])


def test_minari_reader(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    minari = pytest.importorskip("minari")

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    env = minari.DataCollector(gym.make("Pendulum-v1", max_episode_steps=5))
    for seed in range(2):
        env.reset(seed=seed)
        for _ in range(5):
            env.step(env.action_space.sample())
    minari.delete_dataset  # noqa: B018  (the public API this test relies on)
    env.create_dataset(dataset_id="pendulum/test-v0", algorithm_name="random")
    folder = os.path.join(tmp_path, "pendulum", "test-v0")
    assert is_minari(folder)
    data = load_dataset(folder, envs.make_env("Pendulum-v1", 1, workers=0))
    assert data.episode_lengths.tolist() == [5, 5] and data.truncated.tolist() == [True, True]
    assert data.obs["state"].shape == (10, 3) and data.actions.shape == (10, 1) and (data.rewards <= 0).all()


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_load_lerobot_parquet(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(0)
    tasks = ["put the bowl on the plate", "open the drawer"]
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks))
    )
    frames = {}
    for ep, (length, task) in enumerate([(4, 1), (3, 0), (5, 1)]):
        img = rng.integers(0, 255, (length, 8, 8, 3), dtype=np.uint8)
        frames[ep] = img
        table = pa.table(
            {
                "image": [{"bytes": _png(x), "path": None} for x in img],
                "wrist_image": [{"bytes": _png(x[::-1]), "path": None} for x in img],
                "state": [rng.normal(size=8).astype(np.float32).tolist() for _ in range(length)],
                "actions": [np.full(7, ep + 0.1 * t, np.float32).tolist() for t in range(length)],
                "timestamp": np.arange(length, dtype=np.float32) / 10,
                "frame_index": np.arange(length),
                "episode_index": np.full(length, ep),
                "index": np.arange(length),
                "task_index": np.full(length, task),
            }
        )
        table = table.take(np.arange(length)[::-1].copy())  # rows out of time order on disk: the reader sorts
        (tmp_path / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / "data" / "chunk-000" / f"episode_{ep:06d}.parquet")
    data = load_lerobot(tmp_path, prompts=["open the drawer"])
    assert data.episode_lengths.tolist() == [4, 3, 5] and len(data) == 12
    assert data.prompts == ["open the drawer", "put the bowl on the plate"]
    assert data.obs["prompt_id"].tolist() == [0] * 4 + [1] * 3 + [0] * 5
    assert data.obs["state"].shape == (12, 8) and data.actions.shape == (12, 7)
    assert np.allclose(data.actions[:4, 0], [0.0, 0.1, 0.2, 0.3])  # frames in time order
    assert np.array_equal(data.obs["images"]["base_0_rgb"][4:7], frames[1])  # stored upright: no rotation
    assert np.array_equal(data.obs["images"]["left_wrist_0_rgb"][0], frames[0][0][::-1])
    assert data.terminals.tolist() == [False] * 3 + [True] + [False] * 2 + [True] + [False] * 4 + [True]
    assert data.rewards.sum() == 3 and not data.truncated.any()
    small = load_lerobot(tmp_path / "data", max_episodes=2, image_keys={"image": "base_0_rgb"}, image_size=4)
    assert small.episode_lengths.tolist() == [4, 3] and small.obs["images"]["base_0_rgb"].shape == (7, 4, 4, 3)
    assert small.prompts == tasks and small.obs["prompt_id"].tolist() == [1] * 4 + [0] * 3  # meta/ above data/
    # the scripts' --dataset: a LeRobot folder is recognised and read at the env's image size
    assert is_lerobot(tmp_path) and dataset_image_size(tmp_path) == LEROBOT_IMAGE_SIZE
    env = types.SimpleNamespace(prompts=["open the drawer"], action_dim=7)  # what load_dataset reads of an env
    via = load_dataset(tmp_path, env, image_size=6)
    with pytest.raises(ValueError, match="actions have 7 dims, the environment's 2"):
        load_dataset(tmp_path, types.SimpleNamespace(prompts=[], action_dim=2))
    assert via.obs["images"]["base_0_rgb"].shape == (12, 6, 6, 3) and via.prompts == data.prompts
    assert not is_lerobot(tmp_path / "meta")
