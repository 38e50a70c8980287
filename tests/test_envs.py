"""Rules of the push task, its demonstrator, open-loop chunk execution, and the gymnasium adapter."""

import importlib.util
from types import SimpleNamespace

import h5py
import jax
import numpy as np
import pytest

import common.__main__ as cli
from common import RunError, runlog
from common.envs import (
    PUSH_PROMPTS,
    PushDemonstrator,
    PushEnv,
    calibration,
    default_dataset,
    evaluate,
    execute_chunk,
    loop_state,
    make_env,
    make_spec,
    resume_loop,
)
from common.gymenv import GymVecEnv


def place(env: PushEnv, e: int, agent, block, prompt: int = 0) -> None:
    """Put env e's agent and block at given positions, with the named target at (0.65, 0)."""
    env.targets[e] = 0.65 * np.array([[1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866]])
    env.agent[e], env.block[e], env.prompt_id[e] = agent, block, prompt


def test_push_success_terminates_with_reward() -> None:
    env = PushEnv(2, seed=0)
    env.reset()
    place(env, 0, [0.35, 0.0], [0.48, 0.0])  # one push to the right puts the block within 0.12 of red
    _, reward, term, trunc, info = env.step(np.array([[1.0, 0.0], [0.0, 0.0]]))
    assert term.tolist() == [True, False] and reward.tolist() == [1.0, 0.0] and not trunc.any()
    assert info["success"].tolist() == [True, False] and info["subgoal"][0]
    assert env.block[0, 0] > 0.48  # the block was pushed


def test_truncation_at_80_is_not_termination() -> None:
    env = PushEnv(3, seed=1)
    env.reset()
    for t in range(1, 81):
        _, reward, term, trunc, _ = env.step(np.zeros((3, 2)))
        assert not term.any() and reward.sum() == 0
        assert trunc.all() == (t == 80) and trunc.any() == (t == 80)


def test_determinism_and_clipping() -> None:
    rng = np.random.default_rng(0)
    actions = rng.normal(size=(10, 4, 2)) * 3
    runs = []
    for _ in range(2):
        env = PushEnv(4, seed=7)
        obs, _ = env.reset()
        states = [obs["state"]] + [env.step(a)[0]["state"] for a in actions]
        runs.append(np.stack(states))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(PushEnv(4, seed=8).reset()[0]["state"], runs[0][0])
    a, b = PushEnv(1, seed=3), PushEnv(1, seed=3)
    np.testing.assert_allclose(a.step(np.array([[5.0, -9.0]]))[0]["state"], b.step(np.array([[1.0, -1.0]]))[0]["state"])


@pytest.mark.parametrize("size", [32, 64, 224])
def test_images(size: int) -> None:
    env = PushEnv(2, image_size=size)
    obs, _ = env.reset()
    img = obs["images"]["base_0_rgb"]
    assert env.camera_names == ["base_0_rgb"] and img.shape == (2, size, size, 3) and img.dtype == np.uint8
    assert len(np.unique(img.reshape(-1, 3), axis=0)) >= 5  # background, 3 targets, block, agent
    assert PushEnv(2).reset()[0]["images"] == {}


def rollout_success(noise: float, n: int = 200) -> float:
    env, expert = PushEnv(n, seed=11), PushDemonstrator(noise, seed=12)
    obs, _ = env.reset()
    active, success = np.ones(n, bool), np.zeros(n, bool)
    while active.any():
        obs, _, term, trunc, _ = env.step(expert.act(obs), active=active)
        success |= term
        active &= ~(term | trunc)
    return success.mean()


def test_demonstrator_success_matches_design() -> None:
    assert rollout_success(0.3) >= 0.9
    assert 0.2 <= rollout_success(1.0) <= 0.6


def test_execute_chunk_stops_ended_envs_and_autoresets() -> None:
    gamma, h = 0.9, 4
    env = PushEnv(3, seed=2)
    obs, _ = env.reset()
    place(env, 0, [0.21, 0.0], [0.34, 0.0])  # succeeds on the 3rd push step (k = 2)
    place(env, 1, [-0.5, 0.5], [0.0, -0.3])
    env.elapsed[1] = 78  # truncated after 2 steps (k = 1)
    place(env, 2, [-0.5, -0.5], [0.0, 0.3])
    obs = env._obs()
    actions = np.zeros((3, h, 2), np.float32)
    actions[0, :, 0] = 1.0
    actions[1, :, 1] = -1.0
    next_obs, step = execute_chunk(env, obs, actions, gamma)
    assert step.valid.tolist() == [[True] * 3 + [False], [True, True, False, False], [True] * 4]
    assert step.terminated.tolist() == [True, False, False] and step.truncated.tolist() == [False, True, False]
    assert step.step_terminated[0].tolist() == [False, False, True, False] and step.step_truncated[1, 1]
    np.testing.assert_allclose(step.rewards[0], [0, 0, 1, 0])
    np.testing.assert_allclose(step.discounted_return, [gamma**2, 0, 0], rtol=1e-6)
    assert step.success.tolist() == [True, False, False]
    # Final obs: the block of env 0 sits where the 3rd push left it (not pushed a 4th time), agent 1 moved 2 steps.
    np.testing.assert_allclose(step.final_obs["state"][0, 2], 0.34 + 3 * env.speed, atol=1e-5)
    np.testing.assert_allclose(step.final_obs["state"][1, 1], 0.5 - 2 * env.speed, atol=1e-5)
    # Ended envs were reset (fresh episodes), the running one continues from its final obs.
    assert env.elapsed.tolist() == [0, 0, 4]
    np.testing.assert_array_equal(next_obs["state"][2], step.final_obs["state"][2])
    assert not np.allclose(next_obs["state"][:2], step.final_obs["state"][:2])


def test_gym_adapter_pendulum() -> None:
    env = make_env("Pendulum-v1", num_envs=2, seed=0)
    assert isinstance(env, GymVecEnv) and env.prompts == [""] and env.state_dim == 3 and env.action_dim == 1
    obs, _ = env.reset()
    assert obs["state"].shape == (2, 3) and obs["prompt_id"].tolist() == [0, 0] and obs["images"] == {}
    again = GymVecEnv("Pendulum-v1", 2, seed=0).reset()[0]
    np.testing.assert_array_equal(obs["state"], again["state"])
    ended = []
    for _ in range(4):  # Pendulum truncates at 200 steps
        obs, step = execute_chunk(env, obs, np.full((2, 50, 1), 5.0), 0.99)
        ended.append(step.truncated.tolist())
        assert (step.rewards <= 0).all() and not step.terminated.any()
    assert ended == [[False, False]] * 3 + [[True, True]] and step.valid.all()  # truncated at step 200 exactly


def test_bad_env_ids() -> None:
    with pytest.raises(ValueError, match="'push', 'libero'"):
        make_env("NoSuchEnv-v0", num_envs=1)
    with pytest.raises(ValueError, match="Box"):
        make_env("FrozenLake-v1", num_envs=1)
    if importlib.util.find_spec("common.libero") is None:
        with pytest.raises(ImportError, match="libero"):
            make_env("libero", num_envs=1)


def test_env_spec_decodes_env_kwargs() -> None:
    spec = make_spec("Pendulum-v1", {"max_episode_steps": "5", "render_mode": "rgb_array"})  # a bare word: a string
    assert spec.kwargs == {"max_episode_steps": 5, "render_mode": "rgb_array"} and spec.image_size == 0
    with pytest.raises(RunError, match="--env-kwargs name: push does not take it; it takes image_size"):
        make_spec("push", {"name": "x"})  # push and libero: their constructor's keywords only
    with pytest.raises(RunError, match="--env-kwargs fast_render maybe: true or false"):
        make_spec("libero", {"fast_render": "maybe"})  # a switch (a bool default) takes JSON's true / false only
    assert make_spec("libero", {"fast_render": "true", "async_envs": "false"}).kwargs == {
        "fast_render": True,
        "async_envs": False,
    }
    with pytest.raises(RunError, match=r"--env-kwargs task_ids \[0,3: not valid JSON"):
        make_spec("Pendulum-v1", {"task_ids": "[0,3"})  # looks like JSON, is not
    env = make_spec("push", {"max_episode_steps": "5"}, image_size=16).make(2, seed=0)
    assert (env.max_episode_steps, env.image_size, env.camera_names) == (5, 16, ["base_0_rgb"])
    assert make_spec("push", {"image_size": "8"}, image_size=16).image_size == 8  # --env-kwargs wins
    assert make_spec("Pendulum-v1", {"max_episode_steps": "7"}).make(1, seed=0, evaluation=True).max_episode_steps == 7


def test_cli_and_default_dataset(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "d.h5"
    cli.main(["make-dataset", "--env", "push", "--episodes", "5", "--noise", "0.3", "--out", str(out)])
    assert "demonstrator success" in capsys.readouterr().out
    with h5py.File(out) as f:
        assert len(f["data"]) == 5 and f["data"].attrs["total"] == sum(len(g["actions"]) for g in f["data"].values())
        assert f["data/demo_0"].attrs["language_instruction"] in PUSH_PROMPTS
    monkeypatch.setenv("PI0RL_DATA", str(tmp_path / "cache"))
    path = default_dataset(noise="mixed", episodes=6)
    assert "generated" in capsys.readouterr().out
    assert default_dataset(noise="mixed", episodes=6) == path and capsys.readouterr().out == ""
    with h5py.File(path) as f:
        assert sorted(g.attrs["noise"] for g in f["data"].values()) == [0.3, 0.3, 0.6, 0.6, 1.0, 1.0]


class CountdownEnv:
    """Episodes of 3 steps, reward 1 at every step, termination at the 3rd, with success in each env's episodes
    0, 2, 4, ... (counted per env) only."""

    max_episode_steps, action_dim = 3, 1

    def __init__(self, num_envs: int):
        self.num_envs, self.t, self.episode = num_envs, np.zeros(num_envs, int), np.zeros(num_envs, int)

    def _obs(self):
        return {
            "state": self.t[:, None].astype(np.float32),
            "prompt_id": np.zeros(self.num_envs, np.int32),
            "images": {},
        }

    def reset(self, seed=None):
        self.t[:], self.episode[:] = 0, 0
        return self._obs(), {}

    def reset_where(self, mask):
        self.t[mask], self.episode[mask] = 0, self.episode[mask] + 1
        return self._obs()

    def step(self, actions, active=None):
        act = np.ones(self.num_envs, bool) if active is None else active
        self.t += act
        done = act & (self.t == 3)
        info = {"success": done & (self.episode % 2 == 0), "subgoal": np.zeros(self.num_envs, bool)}
        return self._obs(), act.astype(np.float32), done, np.zeros(self.num_envs, bool), info

    def close(self):
        pass


def test_evaluate_counts_each_env_s_episodes_and_calibration(monkeypatch) -> None:
    made = []
    spec = SimpleNamespace(make=lambda n, seed, evaluation=False, **share: made.append(n) or CountdownEnv(n), kept={})
    values = iter([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])  # one per chunk, the same for every env

    def act(obs, key):
        return np.zeros((len(obs["state"]), 2, 1), np.float32), np.full(len(obs["state"]), next(values))

    g = 0.5
    out, trace = evaluate(spec, act, jax.random.key(0), episodes=3, num_envs=2, seed=0, horizon=2, gamma=g, prefix="p_")
    out.update(calibration(trace, g, "p_"))  # what acrlpd_pi0.py and dsrl_pi0.py measure of their critics
    # 2 envs for 3 episodes: env 0 plays two (chunks of 2 and 1 steps each), env 1 one; 4 chunks in all
    assert made == [2] and next(values) == 50.0
    # successes: the first episode of each env, not env 0's second; every return is 3
    assert out["eval/p_success_rate"] == pytest.approx(2 / 3) and out["eval/p_return"] == 3.0
    # realised: 1 + g + g² from a chunk's first step, 1 at the second chunk (one step left); env 1 counts 2 chunks
    real = [1 + g + g**2, 1.0] * 2 + [1 + g + g**2, 1.0]
    pred = [10.0, 20.0, 30.0, 40.0, 10.0, 20.0]
    assert out["eval/p_q_pred"] == pytest.approx(np.mean(pred)) and out["eval/p_q_realised"] == pytest.approx(
        np.mean(real)
    )
    assert out["eval/p_q_gap"] == pytest.approx(np.mean(pred) - np.mean(real))
    still = lambda obs, key: (np.zeros((len(obs["state"]), 2, 1), np.float32), None)  # no values: no calibration
    without, trace = evaluate(spec, still, jax.random.key(0), episodes=2, num_envs=2, seed=0, horizon=2)
    assert set(without) == {"eval/success_rate", "eval/return"} and made[-1] == 2 and trace.chunks == []


def test_evaluate_spreads_episodes_over_num_envs(monkeypatch) -> None:
    made, calls = [], []
    real = make_spec("push", {})
    make = lambda n, seed, evaluation=False, **share: made.append(n) or real.make(n, seed, evaluation, **share)
    spec = SimpleNamespace(make=make, kept={})

    def act(obs, key):  # stand still: every push episode is truncated after 80 steps = 16 chunks
        calls.append(1)
        return np.zeros((len(obs["state"]), 5, 2), np.float32), None

    out, _ = evaluate(spec, act, jax.random.key(0), episodes=5, num_envs=2, seed=1, horizon=5, gamma=0.99)
    # 2 envs for 5 episodes: env 0 plays episodes 0, 2, 4 and env 1 episodes 1, 3; the last chunk ends env 0's third
    assert made == [2] and len(calls) == 3 * 16 and out == {"eval/success_rate": 0.0, "eval/return": 0.0}


@pytest.mark.parametrize("first", [None, 0])  # one generator for all envs (datasets), one per env (runs)
def test_loop_state_continues_push_exactly(first) -> None:
    """A push env restored from `loop_state` (through a checkpoint's host file) continues as the original does,
    resets and their generators included; an env that cannot save its state starts new episodes at the resume."""
    rng = np.random.default_rng(0)
    env = PushEnv(3, seed=5, first=first)
    obs = env.reset(seed=5)[0]
    for _ in range(30):
        obs = env.step(rng.uniform(-1, 1, (3, 2)))[0]
    saved = runlog._unflatten(runlog._flatten(loop_state(env, obs)))  # as Run.save / Run.restore give it back
    back = PushEnv(3, seed=0, first=first)
    np.testing.assert_equal(resume_loop(back, saved, seed=99), obs)
    for t in range(200):
        a = rng.uniform(-1, 1, (3, 2))
        (o1, r1, te1, tr1, _), (o2, r2, te2, tr2, _) = env.step(a), back.step(a)
        np.testing.assert_equal((o1, r1, te1, tr1), (o2, r2, te2, tr2))
        if (ended := te1 | tr1 | (t % 37 == 0)).any():  # new episodes draw from the restored generator
            np.testing.assert_equal(env.reset_where(ended), back.reset_where(ended))
    gym = GymVecEnv("Pendulum-v1", 2, seed=1)
    assert loop_state(gym, gym.reset()[0]) == {} and resume_loop(gym, {}, seed=7)["state"].shape == (2, 3)


def test_push_envs_split_over_processes_play_the_same_episodes() -> None:
    """A run's 4 envs made as one process's (`first` 0) or as two processes' shares (envs 0-1 and 2-3, as
    `EnvSpec.make_share` makes them) start and restart the same episodes: each env draws from its own generator."""
    whole, halves = PushEnv(4, seed=3, first=0), [PushEnv(2, seed=3, first=0), PushEnv(2, seed=3, first=2)]
    obs = lambda: [whole._obs()["state"], np.concatenate([h._obs()["state"] for h in halves])]
    np.testing.assert_equal(*obs())
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = rng.random(4) < 0.5
        whole.reset_where(mask)
        for i, h in enumerate(halves):
            h.reset_where(mask[2 * i : 2 * i + 2])
        np.testing.assert_equal(*obs())
    assert not np.array_equal(PushEnv(2, seed=3, first=0)._obs()["state"], PushEnv(2, seed=3, first=2)._obs()["state"])
    spec = make_spec("push", {})
    np.testing.assert_equal(spec.make_share(4, seed=3)._obs()["state"], PushEnv(4, seed=3, first=0)._obs()["state"])
