"""bench/memory.py and bench/gpu.py on the CPU preset (their full-size runs: README, "Memory and speed at full size"),
the FLOP count their utilisations rest on, and the phase summary of bench/acrlpd.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import acrlpd  # noqa: E402
import ema  # noqa: E402
import fullsize  # noqa: E402
import gpu  # noqa: E402


def test_matmul_flops_counts_scan_bodies_and_remat():
    """2·M·N·K per matrix product, a scan's body times its length, remat's recomputation in a gradient."""
    w = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    layer = lambda c, w: (jnp.tanh(c @ w), None)
    layers = lambda x, ws: jax.lax.scan(layer, x, ws)[0].sum()
    ws = jax.ShapeDtypeStruct((5, 8, 8), jnp.float32)
    flops = lambda fn, *args: fullsize.matmul_flops(fullsize.Case("f", jax.jit(fn), args, {}, 1, None, None))
    assert flops(lambda x, w: x @ w, x, w) == 2 * 4 * 8 * 8
    assert flops(layers, x, ws) == 5 * 2 * 4 * 8 * 8
    grad = flops(jax.grad(layers, argnums=1), x, ws)  # forward + two products per layer backward
    assert grad == 3 * 5 * 2 * 4 * 8 * 8
    remat = flops(jax.grad(lambda x, ws: jax.lax.scan(jax.checkpoint(layer), x, ws)[0].sum(), argnums=1), x, ws)
    assert remat == 4 * 5 * 2 * 4 * 8 * 8  # the forward once more in the backward pass


@pytest.mark.slow  # ~17 s: bench/memory.py in a subprocess, its cases traced
def test_memory_plan_cpu_preset(tmp_path):
    """Every function of a script compiled for 2 forced host devices from abstract inputs, with XLA's numbers."""
    cmd = [
        sys.executable,
        "bench/memory.py",
        "--preset",
        "cpu",
        "--devices",
        "2",
        "--batch",
        "4",
        "--act-batch",
        "2",
        "--scripts",
        "chunk_awr",
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    result = json.load(open(tmp_path / "memory_one.json"))
    assert result["platform"] == "2 × cpu"
    assert set(result["rows"]) == {"chunk_awr/critic_update", "chunk_awr/policy_update", "chunk_awr/act"}
    for row in result["rows"].values():
        assert row["argument"] > 0 and row["temp"] > 0 and row["peak"] >= row["argument"]
    assert "chunk_awr/policy_update" in out.stdout


@pytest.mark.slow  # ~10-20 s: bench/gpu.py in a subprocess, every case compiled and timed
def test_gpu_bench_cpu_preset(tmp_path):
    """bench/gpu.py's code path on the CPU: real arguments, timed calls, FLOPs; sharing the prefix among the N
    candidates runs N times fewer VLM passes than recomputing it (same chunks)."""
    only = ("acrlpd_pi0/act_bon32", "acrlpd_pi0/act_bon32_recomputed", "acrlpd_pi0/critic_update")
    b = gpu.Bench(preset="cpu", batch=4, act_batch=2, calls=1, only=only, libero=False, out=str(tmp_path / "g.json"))
    rows = gpu.main(b)["rows"]
    assert set(rows) == set(only) and json.load(open(tmp_path / "g.json"))["rows"].keys() == rows.keys()
    for r in rows.values():
        assert r["samples_per_s"] > 0 and r["peak_gb"] > 0 and r["mfu"] is None  # no known peak for a CPU
    shared, recomputed = rows["acrlpd_pi0/act_bon32"], rows["acrlpd_pi0/act_bon32_recomputed"]
    assert recomputed["model_tflops"] > shared["model_tflops"]


@pytest.mark.parametrize("script", fullsize.SCRIPTS)
def test_full_size_cases_trace(script):
    """The full-size (pi0) functions trace from abstract inputs (no compile, nothing allocated): the batches and states
    bench/fullsize.py builds fit what each script's functions read."""
    for case in fullsize.cases(script, fullsize.Setup(preset="pi0", batch=8, act_batch=2)):
        assert fullsize.matmul_flops(case) > 0 or "critic" in case.name


def test_acrlpd_phase_summary():
    """Offline end, lowest evaluation from the online phase's first quarter on, online end and gain; None where a run
    did not evaluate (the default run evaluates only at each phase's end, a stopped run has no online end)."""
    step = [0, 1000, 2000, 2500, 3000, 4000, 5000, 6000]  # 2000 offline + 4000 online updates
    bon = [0.0, 0.3, 0.6, 0.2, 0.5, 0.7, 0.65, 0.8]
    p = acrlpd.phases(step, bon, 2000, 4000)
    assert p["offline_end"] == 0.6 and p["online_end"] == 0.8
    assert p["online_low"] == 0.5  # 2500 is inside the first quarter (2000 + 4000 / 4 = 3000): not counted
    assert abs(p["gain"] - 0.2) < 1e-9
    p = acrlpd.phases([0, 2000, 6000], [0.0, 0.4, None], 2000, 4000)  # plain π₀ not evaluated at the end
    assert p["online_end"] is None and p["gain"] is None and p["online_low"] is None
    p = acrlpd.phases([0, 2000, 4000], [0.0, 0.4, 0.3], 2000, 4000)  # stopped halfway
    assert p["online_end"] is None and p["online_low"] == 0.3
    run = {"seed": 7, "step": step, "success": bon, "plain": [None] * len(step), "offline_steps": 2000}
    rows = acrlpd.summary_rows([run | {"online_steps": 4000}])
    assert rows[1].split() == ["7", "BoN", "|", "60%", "50%", "80%", "+20"]
    assert rows[2].split() == ["7", "plain", "|", "-", "-", "-", "-"]


def test_ema_summary():
    """The last five's standard deviation counts a steady climb; the detrended one does not; the drop is the fall
    below the best evaluation before it; the floor is one evaluation's binomial noise at their mean."""
    climb = [(i * 1000, s) for i, s in enumerate([0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8])]
    out = ema.summary(climb, 5, 100)
    assert out["end"] == 0.8 and abs(out["last_mean"] - 0.6) < 1e-9
    assert abs(out["last_std"] - np.std([0.4, 0.5, 0.6, 0.7, 0.8])) < 1e-9 and out["last_detrended_std"] < 1e-9
    assert out["last_drop"] == 0.0 and abs(out["last_swing"] - 0.1) < 1e-9
    assert abs(out["floor"] - np.sqrt(0.6 * 0.4 / 100)) < 1e-9
    zigzag = [(i * 1000, s) for i, s in enumerate([0.5, 0.7, 0.4, 0.6, 0.5])]
    out = ema.summary(zigzag, 5, 2000)
    assert abs(out["last_drop"] - 0.3) < 1e-9 and out["last_detrended_std"] > 0.1
    assert abs(out["last_swing"] - 0.2) < 1e-9 and out["floor"] < 0.012
