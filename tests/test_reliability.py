"""Runs that survive kills and bad input: each script killed at random moments (SIGKILL, during a save, SIGTERM) and
resumed gives the metrics of the uninterrupted run; every bad input stops before any work with one line that names
the flag or the file, and leaves every run folder as it was (and no new one)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from tiny import ACRLPD, RUNS, flags, snapshot

import acrlpd_pi0 as ac
import chunk_awr
import flow_ppo as fp
from common import RunError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}  # with conftest's compilation cache


@pytest.fixture(scope="module")
def data(tmp_path_factory, small_push):
    """Small push datasets: a good one and broken copies (empty, cut in half, a NaN action)."""
    d = tmp_path_factory.mktemp("data")
    good = shutil.copy(small_push, d / "push.h5")
    (d / "empty.h5").write_bytes(b"")
    raw = open(good, "rb").read()
    (d / "half.h5").write_bytes(raw[: len(raw) // 2])
    shutil.copy(good, d / "nan.h5")
    with h5py.File(d / "nan.h5", "r+") as f:
        f["data/demo_3/actions"][5, 1] = np.nan
    with h5py.File(d / "pendulum.h5", "w") as f:  # another env's data: state 3, action 1
        g = f.create_group("data/demo_0")
        g["actions"], g["rewards"], g["dones"] = np.zeros((20, 1)), np.zeros(20), np.zeros(20)
        g["obs/state"] = np.zeros((20, 3), np.float32)
    return {k: str(d / f"{k}.h5") for k in ("push", "empty", "half", "nan", "pendulum")}


def launch(script: str, run_dir: str, extra: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, f"{script}.py", *extra, "--run-dir", run_dir],
        cwd=ROOT,
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def metrics(run_dir: str) -> list[dict]:
    """metrics.jsonl without the timings (wall-clock: never equal)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]


def saving(run_dir: str) -> bool:
    """A save is being written: orbax's temporary step folder or a host file's temporary copy."""
    names = (
        os.listdir(os.path.join(run_dir, "checkpoints")) if os.path.isdir(os.path.join(run_dir, "checkpoints")) else []
    )
    names += os.listdir(os.path.join(run_dir, "host")) if os.path.isdir(os.path.join(run_dir, "host")) else []
    return any("tmp" in n for n in names)


def interrupt(proc: subprocess.Popen, run_dir: str, how: str, rng: random.Random, timeout: float = 300) -> int:
    """Wait for the moment `how` names, deliver it, return the exit code (the run may finish first)."""
    start, rows = time.time(), len(metrics(run_dir)) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else 0
    while proc.poll() is None and time.time() - start < timeout:
        if how == "kill during a save" and saving(run_dir):
            proc.send_signal(signal.SIGKILL)
            break
        grown = os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and len(metrics(run_dir)) > rows
        if how != "kill during a save" and grown:
            time.sleep(rng.uniform(0.0, 1.0))  # a random moment after the run got going
            proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
            break
        time.sleep(0.005)
    return proc.wait(timeout=timeout)


@pytest.mark.slow  # 30-50 s per script: four starts of the script, three of them interrupted
@pytest.mark.parametrize("script", list(RUNS))
def test_killed_and_resumed_runs_log_what_an_uninterrupted_run_logs(tmp_path, data, tiny_runs, script):
    cmd = flags(RUNS[script]) + ["--dataset", data["push"]]
    ref_dir = tiny_runs(script)[0]  # the same run, uninterrupted (in-process: the same programs, the same numbers)
    reference = metrics(ref_dir)
    run_dir, rng, outcomes = str(tmp_path / "run"), random.Random(f"{script}-{time.time()}"), []
    for i, how in enumerate(["sigterm", "kill during a save", "kill", None]):
        with open(tmp_path / f"{i}.log", "w") as log:
            proc = launch(script, run_dir, ["--resume"] if i else cmd, log)
            rc = interrupt(proc, run_dir, how, rng) if how else proc.wait(timeout=300)
        out = (tmp_path / f"{i}.log").read_text()
        outcomes.append((how, rc))
        final = str(reference[-1]["step"]) in os.listdir(os.path.join(run_dir, "checkpoints"))
        if how == "sigterm" and not final:  # saved at the next update boundary, exit 0, the command that resumes
            assert rc == 0 and "saved step" in out and "--resume --run-dir" in out, out[-2000:]
        elif how == "sigterm":  # the run had finished (and closed) before the signal came
            assert rc in (0, -signal.SIGTERM), out[-2000:]
        elif how is None:
            assert rc == 0, out[-3000:]
    print(script, outcomes)
    assert outcomes[0] == ("sigterm", 0) and -signal.SIGKILL in [rc for _, rc in outcomes], outcomes  # they landed
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference], outcomes
    for got, want in zip(resumed, reference, strict=True):
        assert got.keys() == want.keys(), (got, want)
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5, atol=1e-6, err_msg=str(got))
    if script == "flow_ppo":  # flow_sde's stored and recomputed chain log-likelihoods agree: ratio 1 at first
        assert all(r["charts/first_ratio_dev"] < 1e-5 for r in reference if "charts/first_ratio_dev" in r)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == sorted(
        os.listdir(os.path.join(ref_dir, "checkpoints"))
    )


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def finished(tiny_runs):
    """A finished acrlpd_pi0 run on push (the folder the bad inputs must leave alone)."""
    return tiny_runs("acrlpd_pi0")[0]


def bad_inputs(data, finished, tmp):
    """(script module, Args overrides, what the one line must say) for every bad input the issue lists."""
    other_env = dict(env="Pendulum-v1", dataset=data["pendulum"], pi0_checkpoint=finished)
    as_file = str(tmp / "weights.bin")
    open(as_file, "wb").close()
    return [
        (ac, dict(batch_size=0), "--batch-size must be ≥ 1"),
        (ac, dict(num_envs=0), "--num-envs must be ≥ 1"),
        (chunk_awr, dict(batch_size=0), "--batch-size must be ≥ 1"),
        (fp, dict(num_envs=0), "--num-envs must be ≥ 1"),
        (fp, dict(eval_envs=-1), "--eval-envs must be ≥ 1"),
        (chunk_awr, dict(discrete_state=True), "--discrete-state True: only π₀.₅ reads its state"),
        (ac, dict(gamma=1.5), "--gamma must be in (0, 1]"),
        (ac, dict(env_kwargs={"max_episode_steps": "[80"}), "--env-kwargs max_episode_steps [80: not valid JSON"),
        (ac, dict(env_kwargs={"colour": "red"}), "--env-kwargs colour: push does not take it"),
        (ac, dict(dataset=data["empty"]), f"{data['empty']}: not a readable HDF5 file"),
        (
            chunk_awr,
            dict(dataset=data["half"]),
            f"{data['half']}: not a readable HDF5 file (Unable to synchronously open file (truncated",
        ),
        (fp, dict(dataset=data["nan"]), f"{data['nan']}:data/demo_3: actions holds NaN or inf"),
        (ac, dict(dataset=str(tmp / "nowhere.h5")), "--dataset"),
        (ac, dict(pi0_checkpoint=as_file), f"--pi0-checkpoint {as_file} is a file"),
        (fp, dict(pi0_checkpoint=str(tmp / "nowhere")), "does not exist"),
        (ac, other_env, "its norm stats have 2 actions dims, the env has 1"),
        (ac, dict(run_dir=finished), f"--run-dir {finished} is not empty"),
        (ac, dict(run_dir=finished, resume=True, lr=0.5), "--resume: --lr 0.5 (the run has 0.001)"),
        (chunk_awr, dict(run_dir=finished, resume=True), f"--run-dir {finished} is a run of acrlpd_pi0.py"),
        (fp, dict(resume=True, run_dir=None), "--resume needs --run-dir"),
        (ac, dict(run_dir=str(tmp), resume=True), "no args.json there"),
        (ac, dict(pi0_checkpoint=finished, offline_steps=8), "--offline-steps 8 needs prior data: pass --dataset"),
        (ac, dict(eval_episodes=0), "--eval-episodes must be ≥ 1"),
        (ac, dict(env="nonsense"), "unknown environment 'nonsense'"),  # before asking for --dataset
        (chunk_awr, dict(env="CartPole-v1"), "'CartPole-v1' has action space Discrete(2)"),
        (ac, dict(critic_hidden=(0,)), "--critic-hidden 0: one width ≥ 1 per hidden layer"),
        (chunk_awr, dict(critic_hidden=()), "--critic-hidden : one width ≥ 1 per hidden layer"),
        (ac, dict(image_size=-3), "--image-size must be ≥ 0"),
        (ac, dict(action_horizon=200), "--action-horizon 200 is longer than an episode of push (80 steps)"),
        (fp, dict(env_kwargs={"max_episode_steps": "0"}), "--env-kwargs max_episode_steps 0: a whole number"),
        (ac, dict(env_kwargs={"reward_scale": "NaN"}), "--env-kwargs reward_scale nan reward_shift 0.0: finite"),
        (ac, dict(env_kwargs={"colour": "red"}), "it takes image_size, max_episode_steps, reward_scale, reward_shift"),
    ]


def test_bad_input_stops_before_any_work_with_one_line(tmp_path, data, finished):
    before = snapshot(finished)
    for i, (script, kw, message) in enumerate(bad_inputs(data, finished, tmp_path)):
        run_dir = kw.pop("run_dir", str(tmp_path / f"new{i}"))
        with pytest.raises(RunError) as err:
            script.main(script.Args(**{**kw, "run_dir": run_dir}))
        print(f"{script.__name__}: {str(err.value)}")
        assert message in str(err.value) and "\n" not in str(err.value), (kw, str(err.value))
        assert run_dir in (None, finished, str(tmp_path)) or not os.path.exists(run_dir), (kw, os.listdir(run_dir))
    assert snapshot(finished) == before  # the existing run folder was not touched


def test_bad_buffer_on_resume(tmp_path, finished):
    """A lost or broken host file (replay buffer, env state) stops the resume with what to do."""
    run_dir = str(tmp_path / "copy")
    shutil.copytree(finished, run_dir)
    open(os.path.join(run_dir, "host", "16.p0.npz"), "wb").close()  # the last step's, as a kill left it before
    with pytest.raises(
        RunError, match="the replay buffer and env state of step 16 are lost: move .*checkpoints/16 out .* from step 12"
    ):
        ac.main(ac.Args(run_dir=run_dir, resume=True))


def test_nan_loss_stops_at_the_next_log(tmp_path, data):
    """`Run.report` (every script's log) stops at a NaN loss; nothing NaN is saved, the signal handlers are back."""
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunError, match=r"offline step 4: losses/bc = nan.*no checkpoint was saved yet"):
        ac.main(ac.Args(**{**ACRLPD, "lr": 1e9, "critic_lr": 1e9}, dataset=data["push"], run_dir=str(tmp_path / "a")))
    assert os.listdir(tmp_path / "a" / "checkpoints") == [] and signal.getsignal(signal.SIGINT) is handler


@pytest.mark.slow  # ~17 s: three scripts started from the shell, one saving into a full disk
def test_command_line_errors_are_one_line(tmp_path, data):
    """From the shell: one line on stderr (no traceback), exit status 2, and no run folder left behind; a full disk
    (writes beyond a file-size limit fail) while saving reads the same way."""
    cases = [  # --eval-episodes 0 once crashed acrlpd after its offline phase: now refused before any work
        ("chunk_awr.py", "--batch-size", "error: --batch-size must be ≥ 1 (got 0)"),
        ("acrlpd_pi0.py", "--eval-episodes", "error: --eval-episodes must be ≥ 1 (got 0)"),
    ]
    for i, (script, flag, line) in enumerate(cases):
        run_dir = tmp_path / f"x{i}"
        cmd = [sys.executable, script, flag, "0", "--run-dir", str(run_dir)]
        res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [line]
        assert not os.path.exists(run_dir) and "Traceback" not in res.stdout

    no_cache = {**ENV, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1e9"}  # read the compile cache, write none
    cmd = flags({**ACRLPD, "online_steps": 0}) + ["--dataset", data["push"], "--run-dir", str(tmp_path / "full")]
    small_files = (  # EFBIG on any write past 300 kB: orbax's array files fail, as on a full disk
        "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000)); os.execv(sys.executable, sys.argv[1:])"
    )
    res = subprocess.run(
        [sys.executable, "-c", small_files, sys.executable, "acrlpd_pi0.py", *cmd],
        cwd=ROOT,
        env=no_cache,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: saving step 4 in") and "failed (File too large)" in line and "--resume" in line
