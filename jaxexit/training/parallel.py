"""Data parallelism through `jax.sharding`: a 1-D mesh over every device, batches split along it,
parameters and optimiser state replicated. Multi-host: each process feeds its own slice of every
global batch (`jax.make_array_from_process_local_data`)."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def maybe_initialize_distributed() -> None:
    """Join a multi-host run when the launcher says so (JAX_COORDINATOR_ADDRESS, or a cluster
    environment `jax.distributed` detects, e.g. SLURM or Cloud TPU); a no-op on one host."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("JAXEXIT_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def training_mesh(*batch_sizes: int) -> Mesh:
    """Join a multi-host run if there is one, and the data mesh over every device, after checking
    that every global batch size given splits evenly over it."""
    maybe_initialize_distributed()
    mesh = data_mesh()
    for size in batch_sizes:
        check_batch_size(size, mesh)
    return mesh


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    devices = mesh.devices.size
    if global_batch % devices:
        raise ValueError(f"batch size {global_batch} is not divisible by the {devices} devices")
    if global_batch % jax.process_count():
        raise ValueError(f"batch size {global_batch} is not divisible by the {jax.process_count()} processes")


def process_slice(global_batch: int) -> slice:
    """This process's rows of a global batch (all of them on one host)."""
    per_process = global_batch // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a global host batch on the mesh, split along the batch axis.

    Every process holds the whole global batch (GLUE fits in host memory); each contributes its
    own slice, so the same code runs on one device, one host with many, or many hosts.
    """
    sharding = batch_sharding(mesh)
    rows = process_slice(len(next(iter(batch.values()))))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)[rows]) for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))
