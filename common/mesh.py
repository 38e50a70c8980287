"""The device mesh: FSDP parameter sharding, data sharding and several hosts, with JAX's own sharding and runtime.

One mesh with axes ("batch", "fsdp"): parameters sharded over "fsdp" (openpi's rule), the batch over both. On several
hosts every process draws the same global batches and feeds its own rows, steps its own share of the envs and acts
on them through `host_local`, so that a run gives the same numbers on any number of processes; it pulls results
back whole and agrees with the others on what decides the control flow (every jitted call is a collective). With
one process every helper is the plain single-host operation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from common import RunError

BATCH_AXES = ("batch", "fsdp")  # the batch is split over every device


def init_distributed() -> None:
    """Join a multi-host run when the launcher says so: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID on every host, or SLURM (jax finds them itself). A single host does nothing."""
    if jax.distributed.is_initialized():
        return
    if address := os.environ.get("JAX_COORDINATOR_ADDRESS"):
        try:
            count, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise RunError(
                f"JAX_COORDINATOR_ADDRESS={address}: also set JAX_NUM_PROCESSES (the number of processes) and "
                "JAX_PROCESS_ID (this one's, 0 to JAX_NUM_PROCESSES - 1), integers, on every host"
            ) from None
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
    elif os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()


def make_mesh(fsdp_devices: int = 1) -> Mesh:
    """All devices of every process as a (batch, fsdp) grid; `fsdp_devices` must divide their number."""
    init_distributed()
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


def check_split(mesh: Mesh, batches: dict[str, int]) -> None:
    """Refuse a global batch size ({flag: size}) that is not a multiple of the device count (equal slices)."""
    n = mesh.devices.size
    for flag, size in batches.items():
        if size % n:
            raise RunError(f"{flag} {size} must be a multiple of the {n} devices: the batch is split evenly over them")


def process_rows(n: int) -> slice:
    """This process's rows of a global batch of `n` (n / process_count of them, in process order)."""
    share = n // jax.process_count()
    return slice(jax.process_index() * share, (jax.process_index() + 1) * share)


def _place_local(tree: Any, sharding: NamedSharding) -> Any:
    """This host's numpy arrays placed with `sharding` (each host passes its own slice)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """This host's numpy batch (the rows its envs made) placed on the mesh, split over the batch axes."""
    return _place_local(batch, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))


def place_batch(batch: Any, mesh: Mesh) -> Any:
    """A global numpy batch (the same on every process) placed split over the batch axes, each process its rows."""
    rows = process_rows(len(jax.tree.leaves(batch)[0]))
    return _place_local(jax.tree.map(lambda x: x[rows], batch), NamedSharding(mesh, PartitionSpec(BATCH_AXES)))


def stack_batches(batches: list[Any], mesh: Mesh) -> Any:
    """Global numpy batches (the same on every process) stacked [U,B,...] for `scan_updates`, split as `place_batch`."""
    rows = process_rows(len(jax.tree.leaves(batches[0])[0]))
    stacked = jax.tree.map(lambda *v: np.stack([x[rows] for x in v]), *batches)
    return _place_local(stacked, NamedSharding(mesh, PartitionSpec(None, BATCH_AXES)))


def to_host(tree: Any) -> Any:
    """A pytree of arrays pulled to this host whole, as numpy (an array spread over several processes: gathered)."""
    spread = lambda x: isinstance(x, jax.Array) and not x.is_fully_addressable
    if any(spread(x) for x in jax.tree.leaves(tree)):
        _settle()  # once for the whole tree, not once per leaf
    pull = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True) if spread(x) else x)
    return jax.tree.map(pull, tree)


def host_local(fn: Callable, mesh: Mesh, keep: int = 0) -> Callable:
    """`fn` (jitted) called by every process at once with its own numpy rows [B_l,...] of a global batch, which `fn`
    sees whole; it returns this process's rows, and its first `keep` outputs (a train state) as they are."""
    if jax.process_count() == 1:
        return fn
    spec, rows = PartitionSpec(BATCH_AXES), lambda args: {len(x) for x in jax.tree.leaves(args) if _is_np(x)}

    def call(*args: Any, **kwargs: Any) -> Any:
        (n,) = rows(args)
        if n % jax.local_device_count() == 0:  # each local device gets its slice of this process's rows
            place = lambda x: multihost_utils.host_local_array_to_global_array(x, mesh, spec) if _is_np(x) else x
            out = fn(*jax.tree.map(place, args), **kwargs)
            local = multihost_utils.global_array_to_host_local_array(out[keep:] if keep else out, mesh, spec)
            local = jax.tree.map(np.asarray, local)
        else:  # gathered: every process runs the whole batch and keeps its own rows
            gather = lambda x: multihost_utils.process_allgather(x, tiled=True) if _is_np(x) else x
            _settle()
            out = fn(*jax.tree.map(gather, args), **kwargs)
            local = jax.tree.map(lambda x: x[process_rows(len(x))], to_host(out[keep:] if keep else out))
        return (*out[:keep], *local) if keep else local

    return call


def _is_np(x: Any) -> bool:
    return isinstance(x, np.ndarray)


def _settle() -> None:
    """Before a collective of host values, on CPUs: wait for every computation dispatched so far (XLA's CPU runtime
    orders programs by their data alone, so a host collective could overtake an update and deadlock the processes)."""
    if jax.default_backend() == "cpu":
        jax.block_until_ready(jax.live_arrays())


def all_rows(tree: Any) -> Any:
    """Every process's host rows (numpy leaves [n_p,...], n_p may differ) concatenated in process order, on every
    process: what all the envs did. Two all-gathers of bytes."""
    if jax.process_count() == 1:
        return tree
    _settle()
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [np.ascontiguousarray(x) for x in leaves]
    counts = multihost_utils.process_allgather(np.array([len(x) for x in leaves], np.int64))  # [P, L]
    row_bytes = [x[0].nbytes if len(x) else x.itemsize * int(np.prod(x.shape[1:])) for x in leaves]
    sizes = counts @ np.asarray(row_bytes, np.int64)  # bytes each process sends
    raw = np.concatenate([np.zeros(0, np.uint8), *(x.reshape(-1).view(np.uint8) for x in leaves)])
    raw = np.pad(raw, (0, int(sizes.max()) - len(raw)))
    every = multihost_utils.process_allgather(raw)  # [P, max bytes]
    parts = [[] for _ in leaves]
    for p, n_p in enumerate(counts):
        at = 0
        for i, (x, k) in enumerate(zip(leaves, n_p, strict=True)):
            size = int(k) * row_bytes[i]
            parts[i].append(every[p, at : at + size].view(x.dtype).reshape(int(k), *x.shape[1:]))
            at += size
    return jax.tree.unflatten(treedef, [np.concatenate(p) for p in parts])


def process_sum(values: Any) -> np.ndarray:
    """Numbers (an array) summed over the processes, on every process."""
    values = np.asarray(values, np.float64)
    if jax.process_count() == 1:
        return values
    _settle()
    return multihost_utils.process_allgather(values.astype(np.float32)).astype(np.float64).sum(0)


def anywhere(flag: bool) -> bool:
    """Whether `flag` is true in any process, on every process."""
    if jax.process_count() == 1:
        return bool(flag)
    _settle()
    return bool(multihost_utils.process_allgather(np.int32(bool(flag))).max())


def agreed(value: Any) -> Any:
    """Process 0's value (JSON, up to 4 kB) on every process: for host values that decide the control flow (time
    budgets, a folder name from the clock), which must be the same everywhere."""
    if jax.process_count() == 1:
        return value
    _settle()
    raw = np.frombuffer(json.dumps(value).encode().ljust(4096), np.uint8)  # trailing blanks: still the same JSON
    return json.loads(bytes(multihost_utils.broadcast_one_to_all(raw)))


def barrier(name: str) -> None:
    """Wait until every process got here (one process: nothing)."""
    if jax.process_count() > 1:
        _settle()
        multihost_utils.sync_global_devices(name)


def map_batches(fn: Callable[[np.ndarray], Any], n: int, batch_size: int) -> Any:
    """`fn(idx)` over index batches covering range(n), each padded to `batch_size` (one compiled shape), pulled to the
    host and concatenated [n, ...]: something of every frame of a dataset, computed once."""
    outs, batch_size = [], min(batch_size, n)  # a small dataset is not padded up to a large batch
    for lo in range(0, n, batch_size):
        idx = np.minimum(np.arange(lo, lo + batch_size), n - 1)
        outs.append(jax.tree.map(lambda x, k=n - lo: x[:k], to_host(fn(idx))))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def scan_updates(step: Callable[[Any, Any, jax.Array], tuple[Any, Any]], state_sharding: Any = None) -> Callable:
    """One jitted `update(state, batches [K,B,...], rng)`: K `step(state, batch, key) -> (state, info)` in a `lax.scan`
    -> the last state (donated, placed by `state_sharding`) and the mean info."""

    def update(state: Any, batches: Any, rng: jax.Array) -> tuple[Any, Any]:
        keys = jax.random.split(rng, jax.tree.leaves(batches)[0].shape[0])
        state, info = jax.lax.scan(lambda st, xs: step(st, *xs), state, (batches, keys))
        return state, jax.tree.map(jnp.mean, info)

    placed = {} if state_sharding is None else {"out_shardings": (state_sharding, None)}
    return jax.jit(update, donate_argnums=0, **placed)
