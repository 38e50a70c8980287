"""Memory plan: XLA's per-device memory analysis of the scripts' jitted functions at full size, compiled for N devices
from abstract inputs (bench/fullsize.py: nothing is allocated, so this runs on a laptop's CPU with N forced host
devices; a full-size π₀ update compiles in ~20 s and ~1.5 GB of host memory).

  python bench/memory.py                          # every function of the three scripts, pi0, 1 device, batch 32
  python bench/memory.py --devices 8 --batch 64 --preset pi05 --freeze-backbone
  python bench/memory.py --search                 # the README table: the largest batch that fits, per script
  python bench/memory.py --compare                # remat and precision: the memory of each choice, batch 32
  python bench/memory.py --preset cpu --devices 2 --batch 4   # the CPU preset (tests/test_bench.py)

Per device: arguments (train state, batch) + outputs − outputs aliased to donated arguments + XLA's temporaries =
`peak`. A function fits when its peak is at most --budget-gb (76 GB: an 80 GB H100/A100 with
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 as the README says). The XLA CPU compiler's analysis stands in for the GPU's:
bench/gpu.py prints the GPU compiler's for the same functions (README: how far apart they were). The devices are
forced host CPUs unless an accelerator with enough devices is visible. Writes bench/results/memory_<mode>.json.
"""

from __future__ import annotations

import os
import sys

if "--devices" in sys.argv or "--search" in sys.argv:  # forced host devices: before jax is imported
    want = 8 if "--search" in sys.argv else int(sys.argv[sys.argv.index("--devices") + 1])
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={want}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import tyro  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fullsize  # noqa: E402

OUT = os.path.join(fullsize.ROOT, "bench", "results")
GB = 1e9
MAIN_UPDATE = {
    "acrlpd_pi0": "acrlpd_pi0/joint_update",
    "chunk_awr": "chunk_awr/policy_update",
    "flow_ppo": "flow_ppo/ppo_update",
    "dsrl_pi0": "dsrl_pi0/sac_update",
}  # the update that trains π₀: the one that limits B


@dataclass(frozen=True)
class Bench(fullsize.Setup):  # what to compile (preset, batch, devices, precision, remat, ...) and how to search
    scripts: tuple[str, ...] = fullsize.SCRIPTS
    """which scripts"""
    search: bool = False
    """the largest batch that fits --budget-gb per script's π₀ update: pi0 and pi05, 1 and 8 devices, with and
    without --freeze-backbone"""
    compare: bool = False
    """the π₀ updates' memory under each remat / precision choice (pi0, 1 device, --batch)"""
    budget_gb: float = 76.0
    """memory a device may use"""
    max_batch: int = 4096
    """--search stops here"""
    out: str = OUT
    """folder for memory_<mode>.json ('' writes nothing)"""


def analyse(case: fullsize.Case) -> dict:
    """Compile `case` and read XLA's per-device memory analysis (GB) and the compile time."""
    t = time.time()
    compiled = case.lower().compile()
    m = compiled.memory_analysis()
    out = {k: getattr(m, f"{k}_size_in_bytes") / GB for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out | {"compile_s": time.time() - t, "samples": case.samples}


def one(b: Bench) -> dict:
    rows = {}
    print(f"{'function':<28} {'args':>7} {'temp':>7} {'peak GB':>8} {'compile':>8}   ({b.preset}, {b.devices} dev)")
    for script in b.scripts:
        for case in fullsize.cases(script, b):
            r = rows[case.name] = analyse(case)
            print(f"{case.name:<28} {r['argument']:7.2f} {r['temp']:7.2f} {r['peak']:8.2f} {r['compile_s']:7.1f}s")
    return rows


def update_peak(b: Bench, script: str, batch: int, **kw) -> dict:
    setup = dataclasses.replace(b, batch=batch, **kw)
    case = next(c for c in fullsize.cases(script, setup) if c.name == MAIN_UPDATE[script])
    return analyse(case)


def largest_batch(b: Bench, script: str, **kw) -> dict:
    """The largest batch (a multiple of the device count d) whose π₀ update fits, to within 1/16: the peaks at d and
    32·d rows give a per-row slope, its prediction is compiled, then a bisection between the largest batch known to
    fit and the smallest known not to."""
    d = kw["devices"]
    peaks = {n: update_peak(b, script, n, **kw) for n in (d, 32 * d)}
    per_row = max((peaks[32 * d]["peak"] - peaks[d]["peak"]) / (31 * d), 1e-6)
    fit = lambda n: peaks[n]["peak"] <= b.budget_gb
    ok = max([n for n in peaks if fit(n)], default=0)
    over = min([n for n in peaks if not fit(n)], default=b.max_batch + d)
    guess = int(ok + (b.budget_gb - peaks[ok]["peak"]) / per_row) // d * d if ok else 0
    while ok and over - ok > max(d, ok // 16):
        n = guess if ok < guess < over else (ok + over) // 2 // d * d
        if n in (ok, over) or n > b.max_batch:
            break
        peaks[n] = update_peak(b, script, n, **kw)
        ok, over = (n, over) if fit(n) else (ok, n)
        guess = 0
    base = peaks[d]["peak"] - d * per_row  # peak ≈ base + rows · per_row
    compiles = [p["compile_s"] for p in peaks.values()]
    return {"batch": ok, "peak": peaks[ok or d]["peak"], "base": base, "per_row": per_row, "compiles": compiles}


def search(b: Bench) -> dict:
    rows = {}
    print(f"largest batch whose π₀ update fits {b.budget_gb:.0f} GB per device")
    print(f"{'script':<11} {'preset':<5} {'dev':>3} {'frozen VLM':>10} {'batch':>6} {'peak GB':>8} {'GB/row':>7}")
    for preset in ("pi0", "pi05"):
        for script in b.scripts:
            for devices in (1, 8):
                for frozen in (False, True) if script != "chunk_awr" else (False,):
                    r = largest_batch(b, script, preset=preset, devices=devices, freeze_backbone=frozen)
                    rows[f"{script}/{preset}/{devices}/{'frozen' if frozen else 'full'}"] = r
                    print(
                        f"{script:<11} {preset:<5} {devices:>3} {'yes' if frozen else 'no':>10} {r['batch']:>6} "
                        f"{r['peak']:8.1f} {r['per_row']:7.2f}   ({sum(r['compiles']):.0f}s to compile "
                        f"{len(r['compiles'])}×)",
                        flush=True,
                    )
    return rows


def compare(b: Bench) -> dict:
    rows = {}
    print(f"π₀ updates, {b.preset}, {b.devices} device(s), batch {b.batch}: peak GB per device")
    choices = [
        ("float32", "none"),
        ("float32", "nothing_saveable"),
        ("bfloat16", "none"),
        ("bfloat16", "dots_with_no_batch_dims_saveable"),
        ("bfloat16", "nothing_saveable"),
    ]
    print(f"{'script':<11} " + " ".join(f"{p[:4]}/{r[:12]:>12}" for p, r in choices))
    for script in b.scripts:
        peaks = []
        for precision, remat in choices:
            r = update_peak(b, script, b.batch, precision=precision, remat=remat)
            rows[f"{script}/{precision}/{remat}"] = r
            peaks.append(r["peak"])
        print(f"{script:<11} " + " ".join(f"{p:17.1f}" for p in peaks), flush=True)
    return rows


def main(b: Bench) -> dict:
    import jax

    mode = "search" if b.search else "compare" if b.compare else "one"
    platform = f"{jax.device_count()} × {jax.devices()[0].platform}"
    print(f"compiling for {platform} devices (XLA {mode})", flush=True)
    t = time.time()
    rows = search(b) if b.search else compare(b) if b.compare else one(b)
    print(f"{time.time() - t:.0f}s in all")
    result = {"bench": dataclasses.asdict(b), "platform": platform, "rows": rows, "wall_s": time.time() - t}
    if b.out:
        os.makedirs(b.out, exist_ok=True)
        with open(os.path.join(b.out, f"memory_{mode}.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(tyro.cli(Bench))
