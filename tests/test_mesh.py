"""FSDP: with 8 forced host devices the sharded flow loss and its gradients equal the single-device ones; the
multi-process helpers are the single-host operations with one process (two: tests/test_multihost.py)."""

import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags
from jax.sharding import PartitionSpec

from common import RunError, mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import jax, jax.numpy as jnp, numpy as np
from common import mesh, pi0
assert jax.device_count() == 8, jax.devices()
config = pi0.make_config("cpu", cameras=("base_0_rgb",), action_dim=4, state_dim=4, action_horizon=4)
model = pi0.Pi0(config)
params = model.init(jax.random.key(0))
B = 8
table = pi0.make_prompt_table(["push the block to the red target"], pi0.BuiltinTokenizer(config.max_token_len))
obs = {"state": np.random.RandomState(0).randn(B, 4).astype(np.float32), "prompt_id": np.zeros(B, np.int32),
       "images": {"base_0_rgb": np.random.RandomState(1).randint(0, 255, (B, 32, 32, 3)).astype(np.uint8)}}
actions = np.random.RandomState(2).randn(B, 4, 4).astype(np.float32)

def loss_fn(params, obs, actions):
    o = pi0.make_observation(config, obs, table)
    return model.flow_loss(params, o, actions, jax.random.key(3)).mean()

grad_fn = jax.jit(jax.value_and_grad(loss_fn))
ref_loss, ref_grads = grad_fn(params, obs, actions)  # one device (the default)

m = mesh.make_mesh(fsdp_devices=4)
shardings = mesh.fsdp_sharding(params, m, min_bytes=0)
sharded = jax.device_put(params, shardings)
n_sharded = sum(len(s.spec) > 0 and any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings))
assert n_sharded > 10, n_sharded
batch = mesh.shard_batch((obs, actions), m)
replicated = jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec())
loss, grads = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(replicated, shardings))(sharded, *batch)
assert len(loss.sharding.device_set) == 8
np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-3, atol=2e-5)  # float32 reduction order differs
print("SHARDED_OK", n_sharded)
"""


@pytest.mark.slow  # ~20 s: a subprocess on 4 forced devices compiling π₀'s sharded loss and gradients
def test_fsdp_loss_and_grads_match_single_device():
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT,
    }
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert "SHARDED_OK" in out.stdout, out.stdout + out.stderr[-3000:]


def test_fsdp_rule():
    assert mesh.fsdp_spec((4, 6, 10), 4, 2, min_bytes=0) == PartitionSpec(None, None, "fsdp")  # largest divisible
    assert mesh.fsdp_spec((4, 6, 9), 4, 2, min_bytes=0) == PartitionSpec(None, "fsdp", None)
    assert mesh.fsdp_spec((3, 5), 4, 2, min_bytes=0) == PartitionSpec()  # nothing divisible: replicate
    assert mesh.fsdp_spec((512, 1024), 4, 2) == PartitionSpec()  # 2 MiB: below the 4 MiB threshold
    assert mesh.fsdp_spec((2048, 1024), 4, 2) == PartitionSpec("fsdp", None)
    assert mesh.fsdp_spec((2048, 1024), 4, 1) == PartitionSpec()
    assert np.prod(mesh.make_mesh(1).devices.shape) >= 1


def test_scan_updates_runs_k_steps_and_averages_info():
    def step(state, batch, key):  # one "update": state += batch + noise(key); info the batch mean
        noise = jax.random.normal(key, ())
        return {"w": state["w"] + batch.sum() + noise}, {"mean": batch.mean(), "noise": noise}

    batches = jnp.arange(12.0).reshape(3, 4)  # K=3 updates of batch size 4
    rng = jax.random.key(0)
    state, info = mesh.scan_updates(step)({"w": jnp.float32(1.0)}, batches, rng)
    w, noises = 1.0, []
    for b, key in zip(batches, jax.random.split(rng, 3), strict=True):  # the same updates, one by one
        w, i = step({"w": w}, b, key)
        w, noises = w["w"], noises + [i["noise"]]
    np.testing.assert_allclose(state["w"], w, rtol=1e-6)
    np.testing.assert_allclose(info["mean"], batches.mean(), rtol=1e-6)
    np.testing.assert_allclose(info["noise"], np.mean(noises), rtol=1e-6)
    replicated = jax.sharding.NamedSharding(mesh.make_mesh(1), PartitionSpec())
    placed = mesh.scan_updates(step, {"w": replicated})({"w": jnp.float32(1.0)}, batches, rng)
    np.testing.assert_allclose(placed[0]["w"], state["w"])


def test_one_process_helpers_are_the_single_host_operations():
    """With one process the multi-process helpers change nothing (tests/test_multihost.py runs them on two), and a
    global batch the devices cannot split evenly is refused in one line."""
    m = mesh.make_mesh(1)
    batch = {"x": np.arange(6.0).reshape(3, 2)}
    np.testing.assert_equal(np.asarray(mesh.stack_batches([batch, batch], m)["x"]), np.stack([batch["x"]] * 2))
    assert mesh.process_rows(6) == slice(0, 6)
    fn = jax.jit(lambda obs: obs["x"] * 2)
    assert mesh.host_local(fn, m) is fn and mesh.all_rows(batch) is batch
    assert mesh.agreed(1.5) == 1.5 and mesh.agreed("runs/a") == "runs/a" and mesh.anywhere(np.bool_(True)) is True
    np.testing.assert_equal(mesh.process_sum([1, 2.5]), [1, 2.5])
    np.testing.assert_equal(mesh.to_host({"y": jnp.ones(2)})["y"], np.ones(2))
    mesh.check_split(m, {"--batch-size": 3})
    with pytest.raises(RunError, match="--batch-size 3 must be a multiple of the 2 devices"):
        mesh.check_split(SimpleNamespace(devices=np.zeros((1, 2))), {"--batch-size": 3})
