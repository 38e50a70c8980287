"""GPU benchmark: the three scripts' full-size jitted functions (bench/fullsize.py) on random weights, no downloads.

  python bench/gpu.py                      # pi0 on one GPU, every function: ~7 min on an H100 / H200
  python bench/gpu.py --preset pi05 --batch 64 --only acrlpd_pi0/joint_update
  python bench/gpu.py --preset cpu --batch 4 --act-batch 2 --calls 2   # the same code paths on a CPU (tests)

Per function: the compile time, XLA's memory analysis on this device (peak GB: arguments + outputs - donated
aliases + temporaries) and the allocator's high-water mark so far, the time per call, samples/s, and two
utilisations of the device's dense bf16 peak. MFU counts the model's FLOPs: the matrix products of the same function
traced without remat (`fullsize.matmul_flops`; XLA's own cost analysis counts a scan's body once). HFU counts those
run with remat's recomputation. The update functions run on their own output (the state is donated, as in the
scripts). Best-of-N acting is timed twice: one VLM pass per observation shared by all N candidates (what
acrlpd_pi0.py does), and the same N·B chunks with a VLM pass each (`_recomputed`). Then LIBERO's env steps/s with EGL
rendering (bench/libero_env.py) when LIBERO is installed. Every result is written to bench/results/gpu.json as it
comes (a run cut short keeps what it measured).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fullsize  # noqa: E402
import jax  # noqa: E402

# dense bf16 peak TFLOP/s by device kind (vendor data sheets, SXM parts)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "GH200": 989.4, "B200": 2250.0}
ORDER = (
    "acrlpd_pi0/joint_update",
    "acrlpd_pi0/act_bon32",
    "acrlpd_pi0/act_bon32_recomputed",
    "flow_ppo/act",
    "chunk_awr/policy_update",
    "flow_ppo/ppo_update",
    "acrlpd_pi0/critic_update",
    "chunk_awr/critic_update",
    "chunk_awr/act",
)  # what matters most first, in case the run is cut short


@dataclass(frozen=True)
class Bench(fullsize.Setup):  # what to run (preset, batch, act_batch, devices, precision, remat, ...) and how
    calls: int = 5
    """timed calls per function (after one untimed call)"""
    only: tuple[str, ...] = ()
    """run these functions only (names as printed)"""
    peak_tflops: float = 0.0
    """the device's dense bf16 peak (0: from its kind, PEAK_TFLOPS)"""
    libero: bool = True
    """LIBERO env steps/s with EGL, when LIBERO is installed"""
    out: str = os.path.join(fullsize.ROOT, "bench", "results", "gpu.json")
    """results file ('' writes nothing)"""


def time_case(case: fullsize.Case, model_flops: float, b: Bench, peak: float) -> dict:
    """Compile, run once, then time `b.calls` calls (updates fed their own output state)."""
    t = time.time()
    lowered = case.lower()
    compiled = lowered.compile()
    compile_s = time.time() - t
    m = compiled.memory_analysis()
    gb = lambda k: getattr(m, f"{k}_size_in_bytes") / 1e9
    peak_gb = gb("argument") + gb("output") - gb("alias") + gb("temp")
    args = case.concrete()
    update = "update" in case.name

    def call(args):
        out = compiled(*args, **{k: v for k, v in case.kwargs.items() if k == "beta"})
        jax.block_until_ready(out)
        return (out[0], *args[1:]) if update else args

    args = call(args)  # the first run (allocation, autotuning)
    t = time.time()
    for _ in range(b.calls):
        args = call(args)
    per_call = (time.time() - t) / b.calls
    del args
    hw = fullsize.matmul_flops(case)
    row = {"compile_s": compile_s, "peak_gb": peak_gb, "temp_gb": gb("temp"), "ms_per_call": per_call * 1e3}
    row["samples_per_s"] = case.samples / per_call
    row["ms_per_sample"] = per_call * 1e3 / case.samples
    row["model_tflops"] = model_flops / 1e12
    row["mfu"] = model_flops / per_call / (peak * 1e12) if peak else None
    row["hfu"] = hw / per_call / (peak * 1e12) if peak else None
    stats = jax.devices()[0].memory_stats() or {}  # the allocator's high-water mark so far (GPU; None on a CPU)
    row["device_peak_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9
    return row


def libero_rate() -> dict:
    """bench/libero_env.py's short run with EGL rendering; {} without LIBERO."""
    if importlib.util.find_spec("libero") is None:
        print("LIBERO is not installed here: no env steps/s (pip install -e '.[libero]')")
        return {}
    env = {**os.environ, "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl"}
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:  # the CPU machine's results in bench/results stay as they are
        cmd = [sys.executable, os.path.join(here, "libero_env.py"), "--envs", "1", "4", "--skip-episode", "--out", tmp]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    print(out.stdout[-2000:], out.stderr[-1000:] if out.returncode else "")
    return {"libero_env": out.stdout[-2000:], "returncode": out.returncode}


def main(b: Bench) -> dict:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    peak = b.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), 0.0)
    print(f"{jax.device_count()} × {kind} (bf16 peak {peak or '?'} TFLOP/s), jax {jax.__version__}, {b.preset}")
    plain = dataclasses.replace(b, remat="none")  # the model's FLOPs: no recomputation
    cases = {c.name: c for s in fullsize.SCRIPTS for c in fullsize.cases(s, b)}
    model = {c.name: c for s in fullsize.SCRIPTS for c in fullsize.cases(s, plain)}
    names = [n for n in (*ORDER, *cases) if n in cases and (not b.only or n in b.only)]
    result = {"bench": dataclasses.asdict(b), "device": kind, "jax": jax.__version__, "rows": {}}
    print(
        f"{'function':<34} {'compile':>8} {'peak GB':>8} {'ms/call':>9} {'samples/s':>10} {'MFU':>6} {'HFU':>6} "
        f"{'max in use':>10}"
    )
    for name in dict.fromkeys(names):
        r = result["rows"][name] = time_case(cases[name], fullsize.matmul_flops(model[name]), b, peak)
        pct = lambda x: f"{100 * x:5.1f}%" if x is not None else "     ?"
        print(
            f"{name:<34} {r['compile_s']:7.1f}s {r['peak_gb']:8.2f} {r['ms_per_call']:9.1f} "
            f"{r['samples_per_s']:10.1f} {pct(r['mfu'])} {pct(r['hfu'])} {r['device_peak_gb']:9.1f}G",
            flush=True,
        )
        save(b, result)
    if b.libero:
        result["libero"] = libero_rate()
        save(b, result)
    return result


def save(b: Bench, result: dict) -> None:
    if b.out:
        os.makedirs(os.path.dirname(b.out), exist_ok=True)
        with open(b.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(tyro.cli(Bench))
