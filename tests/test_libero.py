"""LIBERO: the vectorised env on the real simulator (observation mapping, truncation, masks), a LIBERO-layout HDF5
file recorded from the simulator read back through `data.load_episodes`.

Simulator tests skip when the `libero` extra is not installed (pip install -e ".[libero]").
"""

import importlib.util

import numpy as np
import pytest

from common import libero, pi0
from common.data import load_episodes

SIZE = 32  # tiny renders keep the tests fast; the mapping does not depend on the size


def test_quat2axisangle() -> None:
    assert np.allclose(libero.quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])), 0.0)
    half = np.pi / 4  # 90 degrees about z
    assert np.allclose(libero.quat2axisangle(np.array([0, 0, np.sin(half), np.cos(half)])), [0, 0, np.pi / 2])
    axis = np.array([1.0, 2.0, -2.0]) / 3.0  # 180 degrees about a unit axis
    assert np.allclose(libero.quat2axisangle(np.r_[axis, 0.0]), np.pi * axis)


def test_openpi_delta_dims_and_state_offset() -> None:
    # Means like those of openpi's LIBERO norm stats: plain LIBERO actions (pi05_libero), and the same actions with
    # the first state's eef pose and axis-angle subtracted (pi0_libero's extra delta transform).
    state = {"mean": np.array([-0.05, 0.03, 0.76, 2.97, -0.22, -0.13, 0.03, -0.03])}
    plain = {"mean": np.array([0.06, 0.09, -0.09, 0.0, 0.005, -0.006, -0.05])}
    delta = {"mean": plain["mean"] - np.r_[state["mean"][:6], 0.0]}
    assert libero.openpi_delta_dims({"state": state, "actions": plain}) == 0
    assert libero.openpi_delta_dims({"state": state, "actions": delta}) == 6
    s = np.arange(16.0).reshape(2, 8)
    off = pi0.state_offset(s, 7, 6)  # added to every step of a chunk [B, H, 7]
    assert off.shape == (2, 1, 7) and np.array_equal(off[:, 0, :6], s[:, :6]) and not off[..., 6].any()
    assert pi0.state_offset(s, 7, 0) == 0.0


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libero" else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install -e "\.\[libero\]"') as err:
        libero.make_libero_env(num_envs=1)
    assert "apt-get install" in str(err.value)


@pytest.fixture(scope="module")
def vec_env():
    pytest.importorskip("libero")
    env = libero.make_libero_env(
        num_envs=2, seed=0, task_ids=[0, 1], image_size=SIZE, num_steps_wait=2, max_episode_steps=3, fast_render=True
    )
    yield env
    env.close()


def test_env_observation_truncation_and_masks(vec_env) -> None:
    env = vec_env
    assert (env.action_dim, env.state_dim, env.max_episode_steps) == (7, 8, 3)
    assert env.camera_names == ["base_0_rgb", "left_wrist_0_rgb"] and len(env.prompts) == 2
    assert env.prompts[0].startswith("pick up the black bowl")
    obs, _ = env.reset(seed=0)
    assert obs["state"].shape == (2, 8) and obs["state"].dtype == np.float32
    assert obs["prompt_id"].tolist() == [0, 1]
    for cam in env.camera_names:
        img = obs["images"][cam]
        assert img.shape == (2, SIZE, SIZE, 3) and img.dtype == np.uint8 and img.std() > 5  # rendered, not blank
    assert np.all(np.abs(obs["state"][:, 6:8]) < 0.05) and obs["state"][0, 6] > 0  # open gripper fingers
    # Only env 0 moves (up, gripper closing); env 1 is frozen.
    action = np.zeros((2, 7), np.float32)
    action[:, 2], action[:, 6] = 1.0, 1.0
    before = obs["state"].copy()
    obs, reward, term, trunc, info = env.step(action, active=np.array([True, False]))
    assert obs["state"][0, 2] > before[0, 2] and np.array_equal(obs["state"][1], before[1])
    assert not term.any() and not trunc.any() and env.elapsed.tolist() == [1, 0]
    for _ in range(2):
        obs, reward, term, trunc, info = env.step(action)
    # Env 0 reached its 3-step limit: a truncation, not a termination; env 1 is at 2 steps.
    assert trunc.tolist() == [True, False] and not term.any() and not info["success"].any()
    assert reward.tolist() == [0.0, 0.0] and env.elapsed.tolist() == [3, 2]
    # The settling steps (gripper -1) were opening the fingers; +1 reverses that: LIBERO's -1 = open, +1 = close.
    assert obs["state"][0, 6] < before[0, 6] - 1e-4
    obs = env.reset_where(np.array([True, False]))
    assert env.elapsed.tolist() == [0, 2] and obs["prompt_id"].tolist() == [0, 1]
    assert abs(obs["state"][0, 2] - before[0, 2]) < 0.05  # back near the initial pose


def test_eval_schedule_plays_fixed_init_states_in_order(vec_env) -> None:
    env = vec_env
    assert env.eval_schedule[:3] == [(0, 0), (1, 0), (0, 1)]
    assert len(env.eval_schedule) == sum(len(s) for s in env.init_states) == 100  # 50 fixed init states per task
    # Training: task round robin over envs, random init states.
    assert env._next_episode(0)[0] == 0 and env._next_episode(1)[0] == 1


@pytest.mark.slow  # ~20 s: the demo recorded from the real simulator (conftest)
def test_libero_hdf5_recorded_from_the_simulator_reads_back(libero_demo) -> None:
    demo, steps = libero_demo.demo, libero_demo.steps  # recorded and written by the conftest fixture
    prompts = ["another task"]
    data = load_episodes(libero_demo.dir, prompts=prompts)
    assert len(data) == 2 * steps and data.episode_lengths.tolist() == [steps, steps]
    assert data.prompts == ["another task", demo["language"]] and set(data.obs["prompt_id"]) == {1}
    assert sorted(data.obs["images"]) == ["base_0_rgb", "left_wrist_0_rgb"]
    # The reader's mapping equals the env wrapper's: rotated images, eef pos + axis-angle + gripper state.
    assert np.array_equal(data.obs["images"]["base_0_rgb"][2], demo["agentview_rgb"][2][::-1, ::-1])
    assert np.array_equal(data.obs["images"]["left_wrist_0_rgb"][2], demo["eye_in_hand_rgb"][2][::-1, ::-1])
    state = np.concatenate([demo["ee_pos"], demo["ee_ori"], demo["gripper_states"]], 1)
    assert data.obs["state"].shape == (2 * steps, 8) and np.allclose(data.obs["state"][:steps], state)
    assert np.allclose(data.actions[:steps], demo["actions"])
    assert data.terminals.tolist() == [False] * (steps - 1) + [True] + [False] * steps
    assert data.rewards.sum() == 1.0 and not data.truncated.any()
