"""Parity with openpi: load a fixture's `params/` through our openpi loader, feed `reference.npz`'s inputs, compare.

    python tests/openpi_parity.py ../shared/fixtures/openpi_pi0_tiny

Works for any fixture of that format: every size is read off the parameter shapes, the horizon and token length off
the reference arrays, and the number of sampling steps from config.json. Exits non-zero above the tolerances of the
fixtures' README (relative error 1e-4 for v_t, prefix_out and loss; 1e-3 for sampled actions).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import openpi, pi0  # noqa: E402

TOLERANCES = {"v_t": 1e-4, "prefix_out": 1e-4, "loss": 1e-4, "sampled_actions": 1e-3}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def parity(fixture_dir: str) -> dict[str, float]:
    ref = dict(np.load(os.path.join(fixture_dir, "reference.npz")))
    with open(os.path.join(fixture_dir, "config.json")) as f:
        num_steps = int(json.load(f).get("num_steps", 10))
    horizon, max_len = ref["actions"].shape[1], ref["obs/tokenized_prompt"].shape[1]
    params, config = openpi.load_openpi_params(fixture_dir, action_horizon=horizon, max_token_len=max_len)
    model = pi0.Pi0(config)
    cams = [k.split("/")[-1] for k in ref if k.startswith("obs/image/")]
    if tuple(sorted(cams)) != tuple(sorted(config.cameras)):
        raise SystemExit(f"fixture cameras {cams} differ from the model's {config.cameras}")
    obs = pi0.Observation(
        images={c: jnp.asarray(ref[f"obs/image/{c}"]) for c in config.cameras},
        image_masks={c: jnp.asarray(ref[f"obs/image_mask/{c}"]) for c in config.cameras},
        state=jnp.asarray(ref["obs/state"]),
        tokens=jnp.asarray(ref["obs/tokenized_prompt"]),
        token_mask=jnp.asarray(ref["obs/tokenized_prompt_mask"]),
    )
    joint = jax.jit(lambda p, *a: model.module.apply({"params": p}, *a))  # openpi's training pass: prefix + suffix
    v_t, prefix_out = joint(params, obs, jnp.asarray(ref["x_t"]), jnp.asarray(ref["time"]))
    loss = jax.jit(model.flow_loss)(
        params,
        obs,
        jnp.asarray(ref["actions"]),
        jax.random.key(0),
        noise=jnp.asarray(ref["noise"]),
        time=jnp.asarray(ref["time"]),
    )

    @jax.jit
    def sample(params, obs, noise):
        return model.sample(params, model.prefix(params, obs), noise[:, None], num_steps)[:, 0]

    sampled = sample(params, obs, jnp.asarray(ref["sample_noise"]))
    return {
        "v_t": rel_err(v_t, ref["v_t"]),
        "prefix_out": rel_err(prefix_out, ref["prefix_out"]),
        "loss": rel_err(loss, ref["loss"]),
        "sampled_actions": rel_err(sampled, ref["sampled_actions"]),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    errors = parity(argv[0])
    ok = True
    for name, err in errors.items():
        passed = err <= TOLERANCES[name]
        ok &= passed
        print(
            f"{os.path.basename(os.path.normpath(argv[0]))}  {name:16s} rel err {err:.2e}  "
            f"(tol {TOLERANCES[name]:.0e})  {'ok' if passed else 'FAIL'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
