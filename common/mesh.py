"""Device mesh, FSDP parameter sharding and data sharding with JAX's own sharding and multi-host runtime.

One mesh with axes ("batch", "fsdp"): parameters are sharded over "fsdp" (openpi's rule: each large array on its
largest dimension divisible by the fsdp size, small ones replicated), the batch over both axes. On several hosts,
`init_distributed()` calls `jax.distributed.initialize()` first, and every host feeds its own slice of the batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from common import RunError

BATCH_AXES = ("batch", "fsdp")  # the batch is split over every device


def init_distributed() -> None:
    """Join a multi-host run when the launcher says so (JAX_COORDINATOR_ADDRESS, or SLURM / Cloud TPU detection).

    Set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on each host (or run under SLURM,
    where jax finds them itself) and start the same command on every host. A single host does nothing.
    """
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()


def make_mesh(fsdp_devices: int = 1) -> Mesh:
    """All devices as a (batch, fsdp) grid; fsdp_devices must divide the device count."""
    n = jax.device_count()
    if fsdp_devices < 1 or n % fsdp_devices:
        raise RunError(f"--fsdp-devices {fsdp_devices} must divide the number of devices ({n})")
    return Mesh(np.asarray(jax.devices()).reshape(n // fsdp_devices, fsdp_devices), BATCH_AXES)


def fsdp_spec(shape: tuple[int, ...], itemsize: int, fsdp_size: int, min_bytes: int = 4 * 2**20) -> PartitionSpec:
    """Shard the largest dimension divisible by the fsdp size; replicate small arrays and indivisible ones."""
    if fsdp_size == 1 or not shape or np.prod(shape) * itemsize < min_bytes:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def fsdp_sharding(tree: Any, mesh: Mesh, min_bytes: int = 4 * 2**20) -> Any:
    """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs), by the FSDP rule."""
    size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), np.dtype(x.dtype).itemsize, size, min_bytes)), tree
    )


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over every device."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _place_local(tree: Any, sharding: NamedSharding) -> Any:
    """This host's numpy arrays placed with `sharding` (on several hosts each passes its own slice)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place this host's numpy batch on the mesh, split over the batch axes (each host passes its own slice)."""
    return _place_local(batch, data_sharding(mesh))


def stack_batches(batches: list[Any], mesh: Mesh) -> Any:
    """This host's numpy batches (dicts of [B,...]) stacked [U,B,...] for `scan_updates`, placed on the mesh with B
    split over the batch axes (each host passes its own slice)."""
    stacked = jax.tree.map(lambda *v: np.stack(v), *batches)
    return _place_local(stacked, NamedSharding(mesh, PartitionSpec(None, BATCH_AXES)))


def map_batches(fn: Callable[[np.ndarray], Any], n: int, batch_size: int) -> Any:
    """`fn(idx)` over row-index batches covering range(n), each padded to `batch_size` by repeating the last row (one
    compiled shape), pulled to the host and concatenated: a pytree of numpy arrays [n, ...]. For computing something
    of every frame of a dataset once (encoded features, advantages)."""
    outs, batch_size = [], min(batch_size, n)  # a small dataset is not padded up to a large batch
    for lo in range(0, n, batch_size):
        idx = np.minimum(np.arange(lo, lo + batch_size), n - 1)
        outs.append(jax.tree.map(lambda x, k=n - lo: np.asarray(x)[:k], jax.device_get(fn(idx))))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def scan_updates(step: Callable[[Any, Any, jax.Array], tuple[Any, Any]], state_sharding: Any = None) -> Callable:
    """One jitted `update(state, batches, rng) -> (state, info)` that runs K updates `step(state, batch, key) ->
    (state, info)` in one `lax.scan` over batches stacked [K,B,...], one key split off `rng` per update, and returns
    the last state (donated: updated in place) and every info entry averaged over the K updates.
    `state_sharding`: where the new state is placed (None: wherever XLA puts it)."""

    def update(state: Any, batches: Any, rng: jax.Array) -> tuple[Any, Any]:
        keys = jax.random.split(rng, jax.tree.leaves(batches)[0].shape[0])
        state, info = jax.lax.scan(lambda st, xs: step(st, *xs), state, (batches, keys))
        return state, jax.tree.map(jnp.mean, info)

    placed = {} if state_sharding is None else {"out_shardings": (state_sharding, None)}
    return jax.jit(update, donate_argnums=0, **placed)
