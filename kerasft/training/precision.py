"""Mixed precision: Keras dtype policies for training, float32 for what is saved and exported.

Training under `"mixed_bfloat16"` or `"mixed_float16"` keeps the variables in float32 and
computes in the lower precision. What kerasft saves is float32 again (`to_float32`): every
exporter and runtime takes float32 graphs, and the weights are the same variables.
"""

from __future__ import annotations

import keras
import numpy as np

from kerasft.model.lora import adapted_layers
from kerasft.training.config import AUTO_PRECISION, MIXED_PRECISION
from kerasft.util import machine

# `mixed_precision="auto"` per backend and CPU class, as measured side by side
# (`benchmarks/results/train_speed*.md`): the CPU classes on which bfloat16 trains faster than
# float32 on that backend, with no loss of accuracy. "avx512_bf16": AVX512_BF16 without AMX
# (AMD Zen 4 and Zen 5); "amx_bf16": Intel's AMX-BF16 tiles (Sapphire Rapids and newer). A CPU
# with neither emulates bfloat16 and always trains in float32. bf16 / fp32 on the AMX Xeon
# (train_speed_amx.md): PyTorch 1.15x, TensorFlow 1.18x, JAX 0.92x; on a Zen 5 EPYC (whole
# `--limit 8000` runs at commit 322688a): PyTorch 1.93x, TensorFlow 1.16x, JAX 0.92x.
AUTO_BF16 = {
    "torch": ("avx512_bf16", "amx_bf16"),
    "tensorflow": ("avx512_bf16", "amx_bf16"),
    "jax": (),
}


def bf16_class(flags: set[str] | None = None) -> str | None:
    """This CPU's bfloat16 class for `AUTO_BF16`: `"amx_bf16"`, `"avx512_bf16"`, or None where
    it has no native bfloat16 matrix instructions."""
    flags = machine.cpu_flags() if flags is None else flags
    if not machine.computes_bf16(flags):
        return None
    return "amx_bf16" if "amx_bf16" in flags else "avx512_bf16"


def resolve_mixed_precision(mixed_precision: str | None, backend: str | None = None) -> str | None:
    """The precision `fit` trains in: `"auto"` is `"bfloat16"` where `AUTO_BF16` says this
    backend trains faster in it on this CPU class (`bf16_class`), else None (float32); any
    other value is itself.

    On CPUs with AVX512_BF16 or AMX-BF16, oneDNN runs bfloat16 matrix products at about twice
    the float32 rate, and PyTorch and TensorFlow call it; JAX's XLA CPU backend gained nothing
    from it when measured, so JAX keeps float32. Elsewhere bfloat16 is emulated and slower.

    Args:
        mixed_precision: `"auto"`, `"bfloat16"`, `"float16"` or None.
        backend: the Keras backend (default: the current one).

    Returns:
        `"bfloat16"`, `"float16"` or None (float32).

    Example:
        >>> resolve_mixed_precision("auto", "jax")  # on any CPU, as measured
        None
    """
    if mixed_precision != AUTO_PRECISION:
        return mixed_precision
    cpu_class = bf16_class()
    backend = backend or keras.backend.backend()
    return "bfloat16" if cpu_class in AUTO_BF16.get(backend, ()) else None


def policy_name(mixed_precision: str | None) -> str | None:
    """`"bfloat16"` -> `"mixed_bfloat16"`; None stays None (float32)."""
    return None if mixed_precision is None else f"mixed_{mixed_precision}"


def check_mixed_precision(mixed_precision: str) -> None:
    """Runs one tiny training step under the policy; raises a clear error if it cannot run.

    Whether a backend can compute a dtype depends on the backend, its version and the device
    (kernels for half precision are missing on some CPUs and backends), so this asks the
    backend itself instead of keeping a table.

    Raises:
        ValueError: `mixed_precision` is not one of `MIXED_PRECISION`, or this backend on this
            device cannot train in it (the message names both and the backend's error).
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"mixed_precision must be one of {list(MIXED_PRECISION)} or None. "
            f"Received: mixed_precision={mixed_precision!r}"
        )
    policy = policy_name(mixed_precision)
    try:
        inputs = keras.Input((8,))
        x = keras.layers.Dense(8, dtype=policy)(inputs)
        x = keras.layers.LayerNormalization(dtype=policy)(x)
        outputs = keras.layers.Dense(2, dtype=policy)(keras.activations.gelu(x))
        model = keras.Model(inputs, outputs)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        )
        rows = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
        loss = model.train_on_batch(rows, np.eye(2, dtype="float32")[[0, 1, 0, 1]])
        if not np.isfinite(float(np.asarray(loss))):
            raise FloatingPointError(f"non-finite loss {loss!r}")
    except Exception as e:
        device = _device()
        raise ValueError(
            f"mixed_precision={mixed_precision!r} does not run on the {keras.backend.backend()} "
            f"backend on {device}: {type(e).__name__}: {str(e).splitlines()[0][:200]}. "
            "Use mixed_precision=None (float32)"
            + (" or 'bfloat16'." if mixed_precision == "float16" else ".")
        ) from e


def to_float32(classifier, copy: bool = False):
    """A plain float32 copy of a KerasHub classifier, or the classifier itself if it is one.

    With `copy=True` always a new model (e.g. one whose variables are local to this process,
    made outside a distribution's scope).

    "Plain": trained under a mixed policy, or with LoRA adapters (`kerasft.model.lora`), the copy
    has float32 compute and ordinary kernels with the adapters merged in. Each layer's variables
    are copied through its own `save_own_variables` / `load_own_variables`, exactly as Keras
    writes and reads a `.keras` file (which merges LoRA the same way).
    """
    plain = classifier.dtype_policy.name == "float32" and not adapted_layers(classifier)
    if plain and not copy:
        return classifier
    config = classifier.get_config()
    config["backbone"]["config"]["dtype"] = "float32"  # the head layers follow the backbone's
    if "dtype" in config:
        config["dtype"] = "float32"
    config["preprocessor"] = classifier.preprocessor  # the same one (its vocabulary is state)
    clone = type(classifier).from_config(config)
    source, target = (m._flatten_layers(include_self=True) for m in (classifier, clone))
    source, target = list(source), list(target)
    if len(source) != len(target):
        raise RuntimeError(f"Copying {classifier.name}: {len(source)} vs {len(target)} layers.")
    for a, b in zip(source, target, strict=True):
        if a is b or not a.weights:
            continue
        store = {}
        a.save_own_variables(store)
        # as NumPy copies: JAX may donate (delete) a buffer the two models would share
        b.load_own_variables({k: np.array(keras.ops.convert_to_numpy(v)) for k, v in store.items()})
    return clone


def _device() -> str:
    try:
        devices = keras.distribution.list_devices()
    except Exception:  # noqa: BLE001 - only for the message
        return "this device"
    return devices[0] if devices else "this device"
