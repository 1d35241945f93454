"""Data parallelism through `jax.sharding`: a 1-D mesh over every device, batches split along it,
parameters and optimiser state replicated. Multi-process (several hosts, or several processes on
one): every process joins through `jax.distributed`, holds the whole global batch and feeds its own
devices' rows of it; CPU processes exchange gradients through gloo (docs/training.md#multi-host)."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"

# The environment a launcher sets for a multi-process run (the command-line flags set the same).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # jax.distributed reads it too
ENV_NUM_PROCESSES = "JAXEXIT_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXEXIT_PROCESS_ID"
ENV_AUTO = "JAXEXIT_DISTRIBUTED"  # "1": whatever cluster jax.distributed detects (SLURM, Open MPI, Cloud TPU)


@dataclasses.dataclass(frozen=True)
class Distributed:
    """How this process joins a multi-process run: the coordinator `host:port` (process 0's),
    the number of processes and this one's id (0..n-1); `auto`: leave what is unset to jax's
    cluster detection (SLURM, Open MPI, Cloud TPU)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def requested(self) -> bool:
        return self.auto or any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))

    def or_else(self, other: "Distributed") -> "Distributed":
        """These settings, `other`'s where these are unset."""
        mine = dataclasses.asdict(self)
        return Distributed(**{k: v if v is not None and v is not False else getattr(other, k) for k, v in mine.items()})

    @classmethod
    def from_env(cls, env=os.environ) -> "Distributed":
        def number(name):
            value = env.get(name)
            if value in (None, ""):
                return None
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected an integer") from None

        return cls(env.get(ENV_COORDINATOR) or None, number(ENV_NUM_PROCESSES), number(ENV_PROCESS_ID),
                   env.get(ENV_AUTO) == "1")


_requested: list[Distributed] = []


def request_distributed(settings: Distributed) -> None:
    """Join the multi-process run `settings` describes when training starts (before it, the flags
    of a command call this; unset fields fall back to the environment). Nothing touches jax here."""
    _requested[:] = [settings]


def maybe_initialize_distributed() -> None:
    """Join a multi-process run if one was requested (`request_distributed`, or the environment:
    JAX_COORDINATOR_ADDRESS, JAXEXIT_NUM_PROCESSES, JAXEXIT_PROCESS_ID, or JAXEXIT_DISTRIBUTED=1 on
    a cluster jax detects); a no-op on one process and when already joined. Must run before anything
    else uses jax in this process."""
    settings = (_requested[0] if _requested else Distributed()).or_else(Distributed.from_env())
    if not settings.requested or jax.distributed.is_initialized():
        return
    if settings.num_processes is not None and settings.num_processes < 1:
        raise ValueError(f"--num-processes {settings.num_processes}: expected at least 1")
    if settings.process_id is not None and settings.num_processes is not None and \
            not 0 <= settings.process_id < settings.num_processes:
        raise ValueError(f"--process-id {settings.process_id}: expected 0..{settings.num_processes - 1} "
                         f"(--num-processes {settings.num_processes})")
    if jax.config.jax_cpu_collectives_implementation is None:  # CPU processes exchange arrays through gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = None not in (settings.coordinator, settings.num_processes, settings.process_id)
    try:  # all three given: no cluster detection (it would also pick the devices each process sees)
        jax.distributed.initialize(settings.coordinator, settings.num_processes, settings.process_id,
                                   cluster_detection_method="deactivate" if explicit and not settings.auto else None)
    except (ValueError, TypeError) as e:  # something unset and no cluster to detect it from
        raise ValueError(
            f"cannot join a multi-process run ({e}): give --coordinator HOST:PORT, --num-processes N and "
            f"--process-id I (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), or run under a "
            "cluster jax detects (SLURM, Open MPI) with --distributed") from None
    except RuntimeError as e:  # jax already in use in this process
        raise RuntimeError(f"cannot join a multi-process run: {e} (join first: "
                           "jaxexit.training.parallel.maybe_initialize_distributed())") from None


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (a collective: every process must call it at the same
    point); `flag` itself on one process."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([bool(flag)], np.int32))))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def training_mesh(*batch_sizes: int) -> Mesh:
    """Join a multi-process run if there is one, and the data mesh over every device (of every
    process), after checking that every global batch size given splits evenly over it."""
    maybe_initialize_distributed()
    mesh = data_mesh()
    for size in batch_sizes:
        check_batch_size(size, mesh)
    return mesh


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    devices = mesh.devices.size
    if global_batch % devices:
        raise ValueError(f"batch size {global_batch} is not divisible by the {devices} devices")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a global host batch on the mesh, split along the batch axis.

    Every process holds the whole global batch (the same one: batches depend only on the seed, the
    epoch and the batch index, and are padded as one); each puts only its own devices' rows on them,
    so the same code runs on one device, one host with many, or many processes.
    """
    sharding = batch_sharding(mesh)

    def place(value):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return {k: place(v) for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))
