"""Several hosts, end to end, on the CPU: each script on 2 local processes (jax.distributed, 2 forced CPU devices each,
--fsdp-devices 2), SIGTERM to one of them mid-run (both save the same step and stop), both resumed: the metrics of
one process on one device, uninterrupted, to the tolerance of tests/test_acrlpd_pi0.py's 4-device test; every
process printed the same evaluation results, and each kept its own host file.

The reference runs on one device, not 4 forced ones: on 2 cores, 4 forced CPU devices in one process can deadlock in
XLA's in-process collectives (flow_ppo's BC update, next to the 2-process run: "Termination timeout for all reduce
... only 3 of them arrived"), blocking collectives filling the runtime's small thread pool; one device has no
collectives, and tests/test_acrlpd_pi0.py already ties 4 devices to one."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tiny
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "offline", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}  # + conftest's JAX_*
TIMEOUT = 420  # s for one start of a run (both processes); a hung coordinator fails the test, never CI
# tests/tiny.py's runs with 10-step episodes (resets, truncations, quick evaluations), stopped at the end of their first
# phase (the resumed run compiles only the second phase's programs); where the flags are the tiny run's own, the
# reference is that in-process run (conftest's `tiny_runs`). flow_ppo with a learned noise head and an entropy bonus,
# so that PPO updates π₀ even without a success in the rollouts (its policy and value losses are then 0): its
# reference is a process of its own
FLAGS = {
    "acrlpd_pi0": tiny.flags(tiny.ACRLPD),
    "chunk_awr": tiny.flags(tiny.CHUNK_AWR),
    "flow_ppo": tiny.flags({**tiny.FLOW_PPO, "env_kwargs": tiny.SHORT, "noise_method": "flow_noise", "ent_coef": 0.01}),
    "dsrl_pi0": tiny.flags(tiny.DSRL),
}
HOST_FILES = {
    "acrlpd_pi0",
    "flow_ppo",
    "dsrl_pi0",
}  # the scripts with host state (envs, replay buffer) in their checkpoints


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(script: str, run_dir: str, flags: list[str], processes: int, logs: str) -> list[subprocess.Popen]:
    """The same command in `processes` processes (several: 2 CPU devices each, finding each other through
    jax.distributed; one: one device); process i's output in <logs>.p<i>.log."""
    port, procs = free_port(), []
    for i in range(processes):
        env = {**ENV, "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={2 if processes > 1 else 1}")}
        if processes > 1:  # no compilation cache: it serves process 0 alone (see above), which then reaches each
            # program's first collective while process 1 still compiles it, and gloo waits 30 s for the others there
            env.pop("JAX_COMPILATION_CACHE_DIR")
            env.update(
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)
            )
        with open(f"{logs}.p{i}.log", "w") as log:
            cmd = [sys.executable, f"{script}.py", *flags, "--run-dir", run_dir]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def finish(procs: list[subprocess.Popen], logs: str, deadline: float) -> list[str]:
    """Wait for every process (all killed at the deadline: a hung collective must not hang CI); their outputs, after
    asserting that each exited with status 0."""
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
    outs = [open(f"{logs}.p{i}.log").read() for i in range(len(procs))]
    for i, (proc, out) in enumerate(zip(procs, outs, strict=True)):
        assert proc.wait() == 0, f"process {i} of {len(procs)}: {proc.returncode}\n{out[-3000:]}"
    return outs


HELPERS = r"""
import jax, numpy as np
from common import envs, mesh
m = mesh.make_mesh(2)  # joins the run (JAX_COORDINATOR_ADDRESS...): 2 processes × 2 CPU devices
p = jax.process_index()
assert jax.process_count() == 2 and jax.device_count() == 4 and mesh.process_rows(6) == slice(3 * p, 3 * p + 3)
# what the envs of each process did, of different lengths and dtypes: every process gets all of it, in order
mine = {"ok": np.array([True, False, True][: 2 + p]), "n": np.arange(2 + p, dtype=np.int64) + 10 * p,
        "x": np.full((2 + p, 3), 0.1 + p), "empty": np.zeros((0, 2), np.float32)}
got = mesh.all_rows(mine)
np.testing.assert_equal(got["ok"], [True, False, True, False, True])
np.testing.assert_equal(got["n"], [0, 1, 10, 11, 12])
assert got["n"].dtype == np.int64 and got["x"].dtype == np.float64 and got["empty"].shape == (0, 2)
np.testing.assert_equal(got["x"][:, 0], [0.1, 0.1, 1.1, 1.1, 1.1])
assert mesh.agreed(0.1 + p) == 0.1 and mesh.agreed(f"run{p}") == "run0" and mesh.anywhere(p == 1)
np.testing.assert_allclose(mesh.process_sum([1.0, p]), [2.0, 1.0])
# acting on each process's rows: a global batch; sharded (2 rows on 2 local devices) or gathered (1 row)
params = jax.device_put(np.float32(3.0), jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec()))
act = mesh.host_local(jax.jit(lambda w, obs, key: (obs["s"] * w + jax.random.normal(key, obs["s"].shape))), m)
for n in (2, 1):
    obs = {"s": np.arange(n * p, n * p + n, dtype=np.float32)[:, None]}  # rows 0..n-1 on process 0
    out = act(params, obs, jax.random.key(0))
    noise = np.asarray(jax.random.normal(jax.random.key(0), (2 * n, 1)))[n * p : n * p + n]
    np.testing.assert_allclose(out, obs["s"] * 3 + noise, rtol=1e-6)  # the rows one process with all of them gets
share, whole = envs.make_spec("push", {}).make_share(4, 3), envs.PushEnv(4, seed=3, first=0)  # envs 2p, 2p + 1
np.testing.assert_equal(share._obs()["state"], whole._obs()["state"][2 * p : 2 * p + 2])
print("HELPERS_OK", p)
"""


def test_helpers_on_two_processes(tmp_path):
    """The multi-process helpers of common/mesh.py and envs' shares, on 2 processes (the scripts use them below)."""
    procs, port = [], free_port()
    for i in range(2):
        env = {**ENV, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2"), "PYTHONPATH": ROOT}
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        with open(tmp_path / f"h.p{i}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", HELPERS], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
    outs = finish(procs, str(tmp_path / "h"), time.time() + 120)
    assert all(f"HELPERS_OK {i}" in out for i, out in enumerate(outs)), outs


def rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def evaluations(out: str) -> list[str]:
    """The evaluation results a process printed, without its label ([... N updates/s] is its own clock)."""
    marks = ("success", "BoN-", "plain π₀")  # chunk_awr and flow_ppo; acrlpd_pi0; dsrl_pi0
    lines = [line for line in out.splitlines() if any(m in line for m in marks) and "steps/s" not in line]
    return [re.sub(r"^\[[^]]*\] ", "", line) for line in lines]  # not the progress lines: process 0 alone prints them


@pytest.mark.slow  # ~60 s each alone on 2 cores, more under the suite's load: 4 processes (2 + 2; flow_ppo's reference
# a fifth), and the 2 processes compile every program at every start (jax's compilation cache would serve process 0
# alone: only process 0 writes it, and process 1's programs have keys of their own)
@pytest.mark.parametrize("script", list(FLAGS))
def test_two_processes_stopped_and_resumed_match_one(tmp_path, small_push, tiny_runs, script):
    flags = FLAGS[script] + ["--dataset", small_push]
    one, two = tmp_path / "one", tmp_path / "two"
    if FLAGS[script] == tiny.flags(tiny.RUNS[script]):
        one, procs = tiny_runs(script)[0], [None]  # made before the 2 processes start: they compete with nothing
    else:
        procs = start(script, str(one), flags, 1, str(one))
    procs += start(script, str(two), flags + ["--fsdp-devices", "2"], 2, str(tmp_path / "a"))
    t0 = time.time()
    try:
        deadline = time.time() + TIMEOUT
        logged = lambda: os.path.exists(two / "metrics.jsonl") and os.path.getsize(two / "metrics.jsonl") > 0
        while not logged() and all(p.poll() is None for p in procs[1:]) and time.time() < deadline:
            time.sleep(0.02)
        procs[2].send_signal(signal.SIGTERM)  # to process 1: process 0 stops with it, at the same step
        first = finish(procs[1:], str(tmp_path / "a"), deadline)
        if procs[0] is not None:
            finish(procs[:1], str(one), deadline)
        reference = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(str(one))]
        stopped = max(int(s) for s in os.listdir(two / "checkpoints") if s.isdigit())
        assert "SIGTERM: saved step" in first[1], first[1][-2000:]
        assert "a signal to another host: saved step" in first[0], first[0][-2000:]
        assert stopped < reference[-1]["step"], f"the signal came after the end (step {stopped})"
        t1 = time.time()
        procs = start(script, str(two), ["--resume"], 2, str(tmp_path / "b"))
        last = finish(procs, str(tmp_path / "b"), time.time() + TIMEOUT)
    finally:
        for p in procs:
            if p is not None and p.poll() is None:
                p.kill()
    got = rows(str(two))
    assert [r["step"] for r in got] == [r["step"] for r in reference]  # process 0 alone logged, each step once
    for g, want in zip(got, reference, strict=True):
        for keys, atol in (([k for k in want if "ratio" not in k], 1e-6), ([k for k in want if "ratio" in k], 1e-5)):
            np.testing.assert_allclose(
                [g[k] for k in keys],
                [want[k] for k in keys],
                rtol=1e-4,
                atol=atol,
                err_msg=f"{script} step {want['step']}: {keys}",
            )
    # (flow_ppo's ratio statistics are exp of differences of float32 log-likelihood sums: rounding ~1e-6 of 1)
    for out in (first, last):  # every process got the same evaluation numbers
        assert evaluations(out[0]) == evaluations(out[1]), out[1][-2000:]
    assert evaluations(last[0]), last[0][-2000:]
    if script in HOST_FILES:
        assert {f"{reference[-1]['step']}.p{i}.npz" for i in (0, 1)} <= set(os.listdir(two / "host"))
    losses = {k: v for r in got for k, v in r.items() if k.startswith("losses/")}  # the last of each
    took = f"{t1 - t0:.0f} s, resumed to {got[-1]['step']} in {time.time() - t1:.0f} s"
    print(f"{script}: stopped at {stopped} after {took};", losses)
