"""Data-parallel training on the engines Keras has: `keras.distribution` (JAX), `tf.distribute`.

This module is the one place that knows about devices and processes. `data_parallel(devices)`
returns a `DataParallelPlan` whose `scope()` wraps model building, compiling, training and
prediction:

- JAX: `keras.distribution.DataParallel` over the chosen devices (the variables replicated, each
  batch split along its first axis). With more than one process (`initialize`, Keras'
  `keras.distribution.initialize`), every process feeds its share of each global batch.
- TensorFlow: `tf.distribute.MirroredStrategy` over the chosen GPUs (or logical CPUs).
- PyTorch: `torch.distributed` (gloo on CPUs, NCCL on GPUs), one process per device, launched
  by `torchrun` or, for `kerasft fit --devices N` on one host, by kerasft through torch's own
  launcher (`kerasft.devices.launcher.launch_local`). Keras 3.15 has no distribution for PyTorch,
  and DDP cannot sit inside Keras' `fit` (which calls the model itself, then `optimizer.apply`), so
  the gradients are averaged with torch.distributed's `all_reduce` in the optimizer step and the
  metrics read over every process's rows (`share_across_processes`).

`batch_size` stays the global batch: it must be a multiple of the device count, and every batch
is split evenly (see `kerasft.tokens.batching.BucketedBatches` for the remainder rule).

Without accelerators, the host CPU can be split into N virtual devices to run the multi-device
path (how Keras tests it): set `KERASFT_CPU_DEVICES=N` before the backend starts.

Example:
    >>> plan = data_parallel("all")
    >>> with plan.scope():
    ...     model = build_and_compile()
    ...     model.fit(batches)
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os

import keras

from kerasft.devices.launcher import torch_world

log = logging.getLogger(__name__)

BACKENDS = ("jax", "tensorflow", "torch")  # the backends kerasft distributes
CPU_DEVICES_ENV = "KERASFT_CPU_DEVICES"
PROCESS_ENV = "KERAS_DISTRIBUTION_NUM_PROCESSES"  # Keras' own multi-process variables
PROCESS_ID_ENV = "KERAS_DISTRIBUTION_PROCESS_ID"
TIMEOUT_ENV = "KERASFT_COLLECTIVE_TIMEOUT"  # seconds a torch collective waits for the others
DEFAULT_TIMEOUT = 600


class DataParallelPlan:
    """Data parallelism over `replicas` devices, with the backend's own engine.

    Attributes:
        devices: the devices' names (every process's, in a multi-process run).
        replicas: how many devices each batch is split across.
        process_index: this process's index (0 in a single-process run).
        process_count: processes taking part.
        engine: the Keras/TensorFlow object doing the work (`DataParallel` or
            `MirroredStrategy`).
    """

    def __init__(self, engine, devices: list[str], process_index: int = 0, process_count: int = 1):
        self.engine, self.devices = engine, list(devices)
        self.replicas = len(self.devices)
        self.process_index, self.process_count = process_index, process_count

    @property
    def shard(self) -> tuple[int, int] | None:
        """`(process index, process count)` for the data, or None in a single process."""
        return (self.process_index, self.process_count) if self.process_count > 1 else None

    @property
    def is_writer(self) -> bool:
        """Whether this process writes files (process 0)."""
        return self.process_index == 0

    def scope(self):
        """The context in which models are built, compiled, trained and used."""
        return self.engine.scope()

    def check_batch_size(self, batch_size: int) -> None:
        """Raises ValueError when `batch_size` does not split evenly across the devices."""
        if batch_size % self.replicas:
            raise ValueError(
                f"batch_size={batch_size} does not split evenly across {self.replicas} devices "
                f"({', '.join(self.devices)}): use a multiple of {self.replicas}."
            )

    def describe(self) -> str:
        engine = type(self.engine).__name__
        where = f"{self.replicas} devices ({', '.join(self.devices)})"
        if self.process_count > 1:
            where += f", process {self.process_index} of {self.process_count}"
        return f"{engine} over {where}"


def data_parallel(devices) -> DataParallelPlan | None:
    """Plans data-parallel training over `devices` on the current Keras backend.

    Args:
        devices: None (one device, no distribution), a device count N >= 1, or `"all"`: every
            device of the backend's default platform (GPUs/TPUs, else CPUs), every process's in
            a multi-process run. N = 1 is one device as well. A ready
            `keras.distribution.DataParallel` (JAX) or `tf.distribute.Strategy` (TensorFlow) is
            used as it is. On PyTorch, the processes of the torchrun (or `launch_local`) run this
            process belongs to: `"all"`, or their count.

    Returns:
        A `DataParallelPlan`, or None for a single device.

    Raises:
        ValueError: a bad `devices` value, more devices than there are (the message lists
            them), or on PyTorch a process that was not launched as one of several (the message
            says how to launch) or a count other than the run's.
    """
    split_host_cpu()  # first: a one-device run in this process must not start JAX/TF unsplit
    if devices is None or devices == 1:
        return None
    if isinstance(devices, DataParallelPlan):
        return devices
    if keras.backend.backend() == "jax" and isinstance(devices, keras.distribution.DataParallel):
        import jax

        names = [str(d) for d in devices.device_mesh.devices.flatten()]
        return DataParallelPlan(devices, names, jax.process_index(), jax.process_count())
    if hasattr(devices, "num_replicas_in_sync") and hasattr(devices, "extended"):
        return DataParallelPlan(devices, list(devices.extended.worker_devices))  # tf.distribute
    check_devices(devices)
    backend = keras.backend.backend()
    if backend == "torch":
        return _torch_plan(devices)
    return _jax_plan(devices) if backend == "jax" else _tensorflow_plan(devices)


def plan_for(distribution, batch_size: int, checkpoint_dir=None) -> DataParallelPlan | None:
    """The `DataParallelPlan` of a fit (None for one device), checked against its options.

    Raises:
        ValueError: a batch size the devices do not divide, or `checkpoint_dir` in a
            multi-process run.
    """
    plan = data_parallel(distribution)
    if plan is None:
        return None
    plan.check_batch_size(batch_size)
    torch = isinstance(plan.engine, TorchProcessGroup)  # process 0 writes, every one reads
    if plan.process_count > 1 and checkpoint_dir is not None and not torch:
        raise ValueError(
            "checkpoint_dir is not supported in a multi-process run: every process would "
            "have to read the same checkpoint to resume. Received: checkpoint_dir="
            f"{str(checkpoint_dir)!r} with {plan.process_count} processes."
        )
    log.info(
        "data parallel: %s; batch %d = %d rows per device",
        plan.describe(), batch_size, batch_size // plan.replicas,
    )  # fmt: skip
    return plan


def log_remainders(train, val, recipe) -> None:
    """Says how batches were made even across the devices (see `BucketedBatches`)."""
    n, bs, replicas = len(train.lengths), recipe.batch_size, train.replicas
    cached = recipe.cache_features and recipe.warmup_epochs and train.shard is None
    cached = n % bs % replicas if cached else train.dropped
    log.info(
        "even batches across %d devices: training leaves out %d row(s) per epoch "
        "(stage 1: %d), other rows each epoch; validation pads its "
        "last batch with %d zero-weight row(s)",
        replicas, train.dropped, cached, 0 if val is None else val.padded,
    )  # fmt: skip
    if train.shard is not None and recipe.cache_features and recipe.warmup_epochs:
        log.info("multi-process: stage 1 runs the frozen backbone on every step "
                 "(a feature cache would need every process's rows)")  # fmt: skip


def check_devices(devices, backend: str | None = None) -> None:
    """Raises ValueError for a bad device count, or more than one device on a backend Keras
    cannot distribute (torch); the message says which backends can. Starts no backend."""
    if devices is None or devices == 1:
        return
    if devices != "all" and (isinstance(devices, bool) or not isinstance(devices, int)):
        raise ValueError(f"devices must be an int >= 1 or 'all'. Received: devices={devices!r}")
    if devices != "all" and devices < 1:
        raise ValueError(f"devices must be an int >= 1 or 'all'. Received: devices={devices!r}")
    backend = backend or keras.backend.backend()
    if backend not in BACKENDS:
        raise ValueError(
            f"devices={devices!r}: kerasft distributes training on the {', '.join(BACKENDS)} "
            f"backends (keras.distribution, tf.distribute, torch.distributed), not on {backend}."
        )


class TorchProcessGroup:
    """The engine of a data-parallel run on PyTorch: torch.distributed's default process group,
    one process per device; each process trains its share of every batch.

    Attributes:
        backend: the collectives' backend, `"gloo"` (CPU) or `"nccl"` (CUDA).
        rank: this process's rank; `world_size`: the processes in the group.
    """

    def __init__(self):
        import torch.distributed as dist

        self.backend, self.rank = dist.get_backend(), dist.get_rank()
        self.world_size = dist.get_world_size()

    def scope(self):
        """Nothing to enter: every process holds the whole model (Keras' PyTorch backend)."""
        return contextlib.nullcontext()


def _torch_plan(devices: int | str) -> DataParallelPlan:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if torch_world() > 1:
            initialize()
        else:
            raise ValueError(
                f"devices={devices!r} on the torch backend trains one process per device: run "
                "`kerasft fit --devices N` (kerasft starts them), or launch this script with "
                "`torchrun --nproc-per-node N` and pass distribution='all'."
            )
    engine = TorchProcessGroup()
    if devices not in ("all", engine.world_size):
        raise ValueError(
            f"devices={devices!r}, but this run has {engine.world_size} processes (one device "
            f"each): pass devices='all' or {engine.world_size}."
        )
    kind = "cuda" if engine.backend == "nccl" else "cpu"
    names = [f"{kind}:{rank}" for rank in range(engine.world_size)]
    return DataParallelPlan(engine, names, engine.rank, engine.world_size)


def share_across_processes(model: keras.Model) -> bool:
    """Makes a compiled `model` train as one over the processes of a PyTorch run.

    Keras' `fit` on PyTorch calls the model, then `optimizer.apply(gradients)`: DDP, which must
    wrap the module being called, cannot sit in between. So this does DDP's part with
    torch.distributed's collectives: the optimizer averages the gradients over the processes
    before each update (one `all_reduce` of all of them flattened, divided by the process count:
    every process holds an equal share of the global batch, so that is the global batch's mean
    gradient), and whenever Keras reads the metrics (every step, and after validation) their
    state variables (totals and counts, all sums) are summed over the processes, read, and set
    back to this process's own. Every process must call `fit`/`evaluate` in step.

    Args:
        model: a model compiled for training.

    Returns:
        True when there is a multi-process PyTorch run to share with (else nothing changes).
    """
    if not _torch_group():
        return False
    optimizer, read = model.optimizer, model.get_metrics_result
    apply = optimizer.apply

    def apply_mean(grads, trainable_variables=None):
        return apply(_all_reduce(grads, mean=True), trainable_variables)

    def global_metrics():
        states = [v for metric in model.metrics for v in metric.variables]
        own = [v.value.detach().clone() for v in states]
        for v, total in zip(states, _all_reduce([v.value for v in states]), strict=True):
            v.assign(total)
        try:
            return read()
        finally:
            for v, value in zip(states, own, strict=True):
                v.assign(value)

    optimizer.apply, model.get_metrics_result = apply_mean, global_metrics
    return True


def _all_reduce(tensors: list, mean: bool = False) -> list:
    """The sums (or means) of `tensors` over the processes: one `all_reduce` per dtype, of the
    tensors of that dtype flattened together (in their own precision: no wider copy to send)."""
    import torch
    import torch.distributed as dist

    out = list(tensors)
    groups: dict = {}
    for i, t in enumerate(tensors):
        if t is not None:
            groups.setdefault(t.dtype, []).append(i)
    for indices in groups.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
        dist.all_reduce(flat)
        if mean:
            flat = flat / dist.get_world_size()
        offset = 0
        for i in indices:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view(tensors[i].shape)
            offset += n
    return out


def _torch_group() -> bool:
    """Whether this process is one of a multi-process PyTorch run."""
    if keras.backend.backend() != "torch":
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_rank() -> int:
    """This process's rank in a multi-process PyTorch run (0 otherwise)."""
    if not _torch_group():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def seed_process(seed: int) -> None:
    """In a multi-process PyTorch run, seeds torch's global generator (dropout masks) with
    `seed + rank`, so that the processes' shares of a batch get independent masks. Python's
    and NumPy's generators (the same on every process) are left alone."""
    if _torch_group():
        import torch

        torch.manual_seed(seed + process_rank())


def gather(value) -> list | None:
    """Every process's `value` (a picklable object), by rank, in a multi-process PyTorch run;
    None otherwise. Every process must call it."""
    if not _torch_group():
        return None
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    """Waits for every process of a multi-process PyTorch run (nothing otherwise)."""
    if _torch_group():
        import torch.distributed as dist

        dist.barrier()


def _pick(available: list[str], devices: int | str) -> list[str]:
    count = len(available) if devices == "all" else devices
    if count > len(available):
        raise ValueError(
            f"devices={devices!r}, but {keras.backend.backend()} sees {len(available)}: "
            f"{available}. Without accelerators, {CPU_DEVICES_ENV}=N splits the CPU into N "
            "virtual devices (set before the backend starts)."
        )
    return available[:count]


def _jax_plan(devices: int | str) -> DataParallelPlan:
    import jax

    chosen = _pick(keras.distribution.list_devices(), devices)
    count = jax.process_count()
    if count > 1 and len(chosen) != jax.device_count():
        raise ValueError(
            f"devices={devices!r}: a {count}-process run trains on every device of every "
            f"process ({jax.device_count()}); use devices='all'."
        )
    engine = keras.distribution.DataParallel(devices=chosen)
    if count > 1:  # `BucketedBatches(shard=...)` gives each process its share of every batch
        engine.auto_shard_dataset = False
    return DataParallelPlan(engine, chosen, jax.process_index(), count)


def _tensorflow_plan(devices: int | str) -> DataParallelPlan:
    import tensorflow as tf

    available = [d.name for d in tf.config.list_logical_devices("GPU")]
    available = available or [d.name for d in tf.config.list_logical_devices("CPU")]
    chosen = _pick(available, devices)
    cross_device_ops = None
    if "GPU" not in chosen[0].upper():  # NCCL all-reduce is for GPUs
        cross_device_ops = tf.distribute.ReductionToOneDevice()
    engine = tf.distribute.MirroredStrategy(chosen, cross_device_ops=cross_device_ops)
    return DataParallelPlan(engine, chosen)


def split_host_cpu() -> int | None:
    """Splits the host CPU into `$KERASFT_CPU_DEVICES` virtual devices, if that is set.

    For running the multi-device path without accelerators (tests, this machine). JAX reads its
    own flag when its backend starts; TensorFlow must be told before it runs anything.

    Returns:
        The number asked for, or None when the variable is unset.

    Raises:
        ValueError: the variable is not a positive int.
        RuntimeError: JAX or TensorFlow already started with another number of CPU devices.
    """
    value = os.environ.get(CPU_DEVICES_ENV)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{CPU_DEVICES_ENV} must be an int >= 1. Received: {value!r}")
    count = int(value)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if jax.config.jax_num_cpu_devices != count:
            try:
                jax.config.update("jax_num_cpu_devices", count)
            except RuntimeError as e:
                if jax.local_device_count("cpu") == count:
                    return count
                raise RuntimeError(
                    f"{CPU_DEVICES_ENV}={count} was set after JAX started; set it (or "
                    f"JAX_NUM_CPU_DEVICES) before the process runs anything."
                ) from e
    elif backend == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]  # (listing logical ones would start TF)
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * count
            )
        except RuntimeError as e:
            if len(tf.config.list_logical_devices("CPU")) != count:
                raise RuntimeError(
                    f"{CPU_DEVICES_ENV}={count} was set after TensorFlow started; set it "
                    "before the process runs anything."
                ) from e
    return count


def initialize() -> bool:
    """Joins a multi-process run when the launcher's variables say there is one.

    - PyTorch: torchrun's `WORLD_SIZE` > 1 (with `RANK`, `LOCAL_RANK`, `MASTER_ADDR`,
      `MASTER_PORT`): `torch.distributed.init_process_group`, gloo on CPUs, NCCL with one GPU
      per process (`LOCAL_RANK`); a collective waits `$KERASFT_COLLECTIVE_TIMEOUT` seconds
      (default 600) for the others, then fails.
    - JAX: `KERAS_DISTRIBUTION_JOB_ADDRESSES` (the coordinator's `host:port`),
      `KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID`, read by
      `keras.distribution.initialize`, which starts JAX's distributed runtime (CPU collectives
      included).

    Call it before anything runs on the backend.

    Returns:
        True when this process joined a multi-process run.

    Raises:
        ValueError: Keras' variables on a backend other than JAX, or a bad timeout.
    """
    backend = keras.backend.backend()
    if backend == "torch" and torch_world() > 1:
        return _torch_initialize()
    if int(os.environ.get(PROCESS_ENV, "1") or 1) <= 1:
        return False
    if backend != "jax":
        raise ValueError(
            f"{PROCESS_ENV}={os.environ[PROCESS_ENV]}: Keras' multi-process variables are for "
            f"the jax backend (keras.distribution.initialize); on torch, launch with torchrun. "
            f"Received backend: {backend}."
        )
    import jax

    if jax.distributed.is_initialized():
        return True
    split_host_cpu()
    keras.distribution.initialize()
    log.info(
        "joined a %d-process run as process %d (%d local devices of %d)",
        jax.process_count(), jax.process_index(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip
    return True


def _torch_initialize() -> bool:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{TIMEOUT_ENV} must be an int >= 1 (seconds). Received: {value!r}")
    cuda = torch.cuda.is_available()
    if cuda:  # one GPU per process, before Keras puts anything on one
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=int(value))
    )
    log.info("joined a %d-process PyTorch run as process %d (torch.distributed, %s)",
             dist.get_world_size(), dist.get_rank(), dist.get_backend())  # fmt: skip
    return True


@contextlib.contextmanager
def maybe_scope(plan: DataParallelPlan | None):
    """`plan.scope()`, or nothing for a single device."""
    if plan is None:
        yield
    else:
        with plan.scope():
            yield
