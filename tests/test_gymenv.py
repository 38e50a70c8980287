"""Gymnasium envs: the worker-process vector env, OGBench's oracle data read back from its npz layout."""

from __future__ import annotations

import importlib.util
import os

import gymnasium as gym
import numpy as np
import pytest

import common.__main__ as cli
from common import RunError, data, envs, gymenv, runlog

OGBENCH = importlib.util.find_spec("ogbench") is not None
CUBE = "ogbench:cube-single-singletask-task1-v0"


def test_workers_match_in_process_envs() -> None:
    """The same seeds and actions give the same transitions whether the envs live in 2 workers or in this process;
    inactive envs are not stepped, reset_where resets only its mask."""
    runs = []
    for workers in (0, 2):
        env = gymenv.GymVecEnv("Pendulum-v1", 3, seed=4, workers=workers, max_episode_steps=6)
        obs, _ = env.reset()
        trace = [obs["state"]]
        rng = np.random.default_rng(0)
        for t in range(7):
            active = np.array([True, t < 3, True])
            obs, r, term, trunc, info = env.step(rng.uniform(-2, 2, (3, 1)), active=active)
            trace += [obs["state"], r, trunc]
        trace.append(env.reset_where(np.array([False, True, False]))["state"])
        env.close()
        runs.append(trace)
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
    states = np.stack(runs[0][1:-1:3])  # [7, E, S] after each step
    assert (states[3:, 1] == states[2, 1]).all() and not (states[3:, 0] == states[2, 0]).all()  # env 1 frozen
    assert runs[0][-2].tolist() == [True, False, True]  # the others past their 6-step limit (no autoreset)


def test_worker_errors_are_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(RunError, match="unknown environment 'NoSuchEnv-v0'"):
        gymenv.GymVecEnv("NoSuchEnv-v0", 2, workers=2)
    with pytest.raises(RunError, match="refused them"):
        gymenv.GymVecEnv("Pendulum-v1", 2, workers=2, no_such_kwarg=1)
    with pytest.raises(RunError, match="only Box observations"):
        gymenv.GymVecEnv("FrozenLake-v1", 2, workers=2)
    env = gymenv.GymVecEnv("Pendulum-v1", 2, workers=2)
    assert "2 envs in 2 worker processes" in capsys.readouterr().out  # the memory line
    env._pool.workers[1].proc.kill()
    env._pool.workers[1].proc.wait()
    with pytest.raises(RunError, match="worker process died"):
        env.reset()
    env.close()


def test_too_many_envs_for_memory_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gymenv, "available_mb", lambda: 1.0)
    with pytest.raises(RunError, match=r"pass --num-envs \(and --eval-envs\) ≤ 1"):
        gymenv.GymVecEnv("Pendulum-v1", 4, workers=2)


@pytest.mark.skipif(not OGBENCH, reason="ogbench not installed")
def test_ogbench_oracle_dataset_round_trip(tmp_path: object, capsys: pytest.CaptureFixture) -> None:
    """make-dataset on OGBench's cube task writes OGBench's layout; reading it relabels the task's rewards (−1, 0 at
    the goal) with a termination at each success, and the vector env on 2 workers runs the same env."""
    out = os.path.join(tmp_path, "cube.npz")
    cli.main(["make-dataset", "--env", CUBE, "--episodes", "3", "--noise", "0.1", "--out", out])
    assert "3 episodes" in capsys.readouterr().out
    raw = np.load(out)
    assert {"observations", "actions", "terminals", "qpos", "qvel"} <= set(raw.files) and raw["terminals"].sum() == 3
    again = os.path.join(tmp_path, "again.npz")  # the same seed (default 0) writes the same episodes
    cli.main(["make-dataset", "--env", CUBE, "--episodes", "3", "--noise", "0.1", "--out", again])
    for k, v in np.load(again).items():
        np.testing.assert_array_equal(v, raw[k], err_msg=k)
    env = envs.make_env(CUBE, 2, seed=0)
    read = data.load_dataset(out, env)
    assert set(np.unique(read.rewards)) <= {-1.0, 0.0} and read.terminals.sum() == (read.rewards == 0).sum() >= 1
    assert (read.rewards[read.terminals] == 0).all() and read.obs["state"].shape[1] == env.state_dim == 28
    obs, step = envs.execute_chunk(env, env.reset()[0], np.zeros((2, 5, 5)), 0.99)
    assert (step.rewards == -1).all() and obs["state"].shape == (2, 28)
    env.close()
    with pytest.raises(SystemExit, match="exists"):
        cli.main(["make-dataset", "--env", CUBE, "--episodes", "1", "--out", out])  # never overwritten
    with pytest.raises(SystemExit, match="recipe 'task' needs an OGBench cube single-task env"):
        cli.main(["make-dataset", "--env", "ogbench:scene-singletask-task1-v0", "--out", out + "2.npz"])


class _Camera(gym.Env):
    """An env whose observations are images (like OGBench's visual-* envs)."""

    observation_space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)


def test_pixel_observations_refused() -> None:
    gym.register("PixelsOnly-v0", entry_point=_Camera)
    with pytest.raises(RunError, match="observes images"):
        gymenv.GymVecEnv("PixelsOnly-v0", 1, workers=0)


SHORT = {"max_episode_steps": "20"}  # evaluations of 20-step episodes (cube's are 200 steps): the run, not the task


@pytest.mark.skipif(not OGBENCH, reason="ogbench not installed")
@pytest.mark.slow  # 30-70 s each under the suite's load: a whole tiny run, compiled, with real MuJoCo envs in workers
@pytest.mark.parametrize("script", ["acrlpd_pi0", "chunk_awr", "flow_ppo", "dsrl_pi0"])
def test_scripts_run_on_ogbench(script: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: object) -> None:
    """Each script's tiny run (tests/tiny.py) through an `ogbench:` id, on oracle data written by make-dataset and
    read back from OGBench's npz layout, with its envs in worker processes (~40 s each, most of it compiling)."""
    import importlib

    import tiny

    out = tmp_path_factory.getbasetemp() / "ogbench_cube_3.npz"
    if not out.exists():  # made once per test process (pytest-xdist runs the three in one or two)
        part = out.with_name(f"{out.name}.{os.getpid()}.npz")
        gymenv.make_ogbench_dataset(part, CUBE, episodes=3, noise=0.1)
        os.replace(part, out)
    module = importlib.import_module(script)
    flags = dict(tiny.RUNS[script], dataset=str(out), run_dir=str(tmp_path / "run"), env_kwargs=SHORT)
    result = module.main(runlog.configured(module.CONFIGS, CUBE, **flags))  # the scripts' "gym" config
    evals = [v for k, v in result.items() if k.endswith("eval/success_rate")]  # acrlpd: offline/ and online
    assert evals and all(0.0 <= v <= 1.0 for v in evals) and os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_dataset_instruction_reaches_the_env(tmp_path: object) -> None:
    """A gymnasium env sends the dataset's instruction (prompt id 0), so evaluation reads what training read; data
    with several instructions is refused for a one-task env unless --env-kwargs prompt names one."""
    from test_data import write_demos

    one = write_demos(os.path.join(tmp_path, "one.h5"), [{"rewards": [0, 1], "dones": [0, 1]}], language="swing up")
    spec = envs.make_spec("Pendulum-v1", {}, dataset=one)
    env = spec.make(1, seed=0)
    assert env.prompts == ["swing up"] and env.reset()[0]["prompt_id"].tolist() == [0]
    assert (data.load_episodes(one, prompts=env.prompts).obs["prompt_id"] == 0).all()
    env.close()
    two = write_demos(os.path.join(tmp_path, "two.h5"), [{"rewards": [1], "dones": [1], "lang": "b"}], language="a")
    with pytest.raises(RunError, match="holds 2 instructions"):
        envs.make_spec("Pendulum-v1", {}, dataset=os.path.dirname(two))  # the folder: "swing up" and "b"
    assert envs.make_spec("Pendulum-v1", {"prompt": "b"}, dataset=two).kwargs["prompt"] == "b"
    assert envs.make_spec("Pendulum-v1", {}, dataset=None).kwargs == {}  # no data: no prompt


def test_workers_exit_with_their_script() -> None:
    """kill -9 of the script: its env workers see their pipe close and exit (none is left behind)."""
    import signal
    import subprocess
    import sys
    import time

    code = (
        "from common.gymenv import GymVecEnv; import time; e = GymVecEnv('Pendulum-v1', 2, workers=2); "
        "print('pids', *[w.proc.pid for w in e._pool.workers], flush=True); time.sleep(60)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=root)
    line = ""
    while not line.startswith("pids"):  # after the memory line
        line = script.stdout.readline()
    pids = [int(p) for p in line.split()[1:]]
    assert len(pids) == 2
    script.send_signal(signal.SIGKILL)
    script.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids)


def _alive(pid: int) -> bool:
    """Running and not a zombie (an exited worker of a killed script is reaped by init, or stays a zombie briefly)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--noise", "abc"], "--noise abc: a number"),
        (["--noise", "-1"], "--noise -1: out of range"),
        (["--episodes", "0"], "--episodes 0: out of range"),
        (["--p-random", "2"], "--p-random 2.0: out of range"),
        (["--noise", "mixed"], "--noise mixed is push's"),
    ],
)
def test_make_dataset_bad_values(tmp_path: object, flags: list[str], says: str) -> None:
    out = os.path.join(tmp_path, "d.npz")
    with pytest.raises(SystemExit, match=says):
        cli.main(["make-dataset", "--env", CUBE, "--out", out, *flags])
    assert not os.path.exists(out)
