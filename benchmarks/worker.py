"""One benchmark variant in its own process, driven by the harness over stdin/stdout.

    python -m kerasft.benchmarks.worker \
        '{"kind": "onnx", "path": "...", "threads": 2, "device": "cpu"}'

The worker loads one model with one runtime and answers JSON-line commands:

- `{"op": "time", "batch": B, "seq": S, "seconds": T, "min_runs": K, "settle": P}` ->
  `{"seconds": [...]}`: a pause of P seconds (the previous variant's runtime threads stop
  spinning on the shared cores), one untimed call on the shape (re-allocation after a shape
  change), then timed calls on the monotonic clock until both T seconds and K calls are reached.
  Each call ends with the logits copied to host memory, which synchronises a GPU.
- `{"op": "time_texts", "batch": B, "seconds": T, "settle": P}` -> `{"seconds": [...]}`: the
  same on raw strings, for the `runtime` kind (`kerasft.exporters.runtime.load(dir).predict(texts)`,
  tokenization included): each call classifies the next B texts of the worker's `texts` file.
- `{"op": "predict", "inputs": NPZ, "out": NPY}`: logits for every batch of a tokenized file.
- `{"op": "stats"}` -> `{"peak_rss_mb": ...}`; `{"op": "quit"}`.

Backend- and runtime-specific code lives here only, one small loader per kind. The inputs of a
timed cell are the same everywhere: token ids drawn with seed 0, every position attended.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from kerasft.benchmarks.pipe import child_pipe, reply
from kerasft.exporters import litert, onnx, openvino, saved_model
from kerasft.exporters.runtime import load
from kerasft.util.timing import call_seconds

MAX_RUNS = 10_000  # per timed block


def set_threads(threads: int) -> None:
    """Intra-op threads of the current Keras backend (TensorFlow: one inter-op thread; JAX's
    XLA CPU client takes every core and has no setting)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)


def _keras(spec):
    """A Keras model on the current backend, through its compiled `predict_on_batch`."""
    import keras

    # lazy: they load Keras, which only the Keras variants' workers need
    from kerasft.training.recipe import core_model
    from kerasft.training.tuner import TwoStageFineTuner

    backend = keras.backend.backend()
    set_threads(spec["threads"])
    model = core_model(TwoStageFineTuner.load(spec["path"]).model)
    if spec.get("int8"):
        with warnings.catch_warnings():  # "Layer X has no quantize method" for non-Dense layers
            warnings.simplefilter("ignore")
            model.quantize("int8")
    # jit_compile="auto": XLA on JAX and TensorFlow; PyTorch runs eagerly under no_grad.
    model.compile(jit_compile="auto")

    def run(ids, mask):
        return np.asarray(model.predict_on_batch({"token_ids": ids, "padding_mask": mask}))

    return run, {"backend": backend, "jit_compile": str(model.jit_compile)}


def _onnx(spec):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = ["CPUExecutionProvider"]
    if spec["device"] == "gpu":
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(spec["path"], options, providers=providers)
    ids_name, mask_name = (i.name for i in session.get_inputs())
    int64 = session.get_inputs()[0].type == "tensor(int64)"

    def run(ids, mask):
        if int64:
            ids, mask = ids.astype("int64"), mask.astype("int64")
        return session.run(None, {ids_name: ids, mask_name: mask})[0]

    return run, {"providers": session.get_providers()}


def _openvino(spec):
    """An OpenVINO IR on the CPU plugin: f32 (or the spec's precision; `"default"`: the plugin's
    own, bf16 on CPUs that compute it), latency hint, threads."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": spec["threads"], "PERFORMANCE_HINT": "LATENCY"}
    if spec.get("precision", "f32") != "default":
        config["INFERENCE_PRECISION_HINT"] = spec.get("precision", "f32")
    compiled = ov.Core().compile_model(spec["path"], "CPU", config)
    request = compiled.create_infer_request()
    # kerasft's IR takes int32 token_ids/padding_mask, optimum-intel's int64
    # input_ids/attention_mask: the inputs by position, in each port's own type.
    ports = list(compiled.inputs)
    dtypes = [port.get_element_type().to_dtype() for port in ports]
    output = compiled.output(0)

    def run(ids, mask):
        inputs = zip(ports, (ids, mask), dtypes, strict=True)
        feed = {port: x.astype(dtype) for port, x, dtype in inputs}
        return np.array(request.infer(feed)[output])

    return run, {"device": "CPU", "config": {k: str(v) for k, v in config.items()}}


def _runtime(spec):
    """`kerasft.exporters.runtime.load(dir).predict(texts)`: raw strings in, tokenized inside."""
    tensorflow_session = spec["format"] == saved_model.CONTRACT.name  # TF's own thread pools
    options = {} if tensorflow_session else {"threads": spec["threads"]}
    if tensorflow_session:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
        tf.config.threading.set_inter_op_parallelism_threads(1)
    model = load(spec["path"], **options)

    def run(texts):
        return model.predict(texts, batch_size=len(texts)).logits

    return run, {"runtime": type(model).__name__}


def _saved_model(spec):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
    tf.config.threading.set_inter_op_parallelism_threads(1)
    signature = tf.saved_model.load(spec["path"]).signatures["serving_default"]

    def run(ids, mask):
        out = signature(token_ids=tf.constant(ids), padding_mask=tf.constant(mask))
        return next(iter(out.values())).numpy()

    return run, {"gpus": len(tf.config.list_physical_devices("GPU"))}


def _litert(spec):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=spec["path"], num_threads=spec["threads"])
    runner = interpreter.get_signature_runner("serving_default")

    def run(ids, mask):
        return next(iter(runner(token_ids=ids, padding_mask=mask).values()))

    return run, {"device": "cpu (LiteRT interpreter)"}


def _transformers(spec):
    """Hugging Face transformers, PyTorch eager, `torch.inference_mode()`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(spec["threads"])
    device = "cuda" if spec["device"] == "gpu" else "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(spec["path"]).eval().to(device)

    def run(ids, mask):
        with torch.inference_mode():
            out = model(
                input_ids=torch.from_numpy(ids).long().to(device),
                attention_mask=torch.from_numpy(mask).long().to(device),
            ).logits
        return out.float().cpu().numpy()

    return run, {"device": device, "torch": torch.__version__}


# By kind: Keras, the runtime, transformers, and each export format (by the name its module
# declares; peers' ONNX files and OpenVINO IRs are served as those formats are).
LOADERS = {
    "keras": _keras,
    "runtime": _runtime,
    "transformers": _transformers,
    onnx.CONTRACT.name: _onnx,
    openvino.CONTRACT.name: _openvino,
    saved_model.CONTRACT.name: _saved_model,
    litert.CONTRACT.name: _litert,
}


def timing_inputs(batch: int, seq: int, vocabulary_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The inputs of a timed cell: token ids drawn with seed 0, every position attended."""
    rng = np.random.default_rng(0)
    low = min(1000, vocabulary_size // 2)  # past the special tokens of any vocabulary
    ids = rng.integers(low, vocabulary_size, size=(batch, seq)).astype("int32")
    return ids, np.ones((batch, seq), dtype="int32")


def _timed(call, cmd: dict, inputs=None) -> list[float]:
    """Seconds of each timed call of a `time` command: one untimed call, then calls for
    `cmd["seconds"]` (at least `min_runs`, at most `MAX_RUNS`)."""
    return call_seconds(
        call, warmup=1, seconds=cmd.get("seconds", 0.0), min_calls=cmd.get("min_runs", 1),
        max_calls=MAX_RUNS, inputs=inputs,
    )  # fmt: skip


def _serve(spec, proto) -> None:
    run, info = LOADERS[spec["kind"]](spec)
    # raw strings for `time_texts`, taken in order across blocks so that every text is timed
    texts = json.loads(Path(spec["texts"]).read_text()) if spec.get("texts") else []
    cursor = {"next": 0}
    reply(proto, {"ready": True, "info": info})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "time":
                ids, mask = timing_inputs(cmd["batch"], cmd["seq"], spec["vocabulary_size"])
                time.sleep(cmd.get("settle", 0.0))
                answer = {"seconds": _timed(lambda i=ids, m=mask: run(i, m), cmd)}
            elif cmd["op"] == "time_texts":

                def chunk(b=cmd["batch"]):  # texts in order across blocks: every one is timed
                    start = cursor["next"]
                    cursor["next"] = (start + b) % len(texts)
                    return [texts[(start + i) % len(texts)] for i in range(b)]

                time.sleep(cmd.get("settle", 0.0))
                answer = {"seconds": _timed(run, cmd, inputs=chunk)}
            elif cmd["op"] == "predict":
                data = np.load(cmd["inputs"])
                n = len([k for k in data.files if k.startswith("ids_")])
                logits = [run(data[f"ids_{i}"], data[f"mask_{i}"]) for i in range(n)]
                np.save(cmd["out"], np.concatenate(logits).astype("float32"))
                answer = {"ok": True}
            elif cmd["op"] == "stats":
                kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                answer = {"peak_rss_mb": round(kib / 1024, 1)}
            elif cmd["op"] == "quit":
                return
            else:
                answer = {"error": f"unknown op {cmd['op']!r}"}
        except Exception as e:  # reported to the harness, which marks the variant failed
            traceback.print_exc()
            answer = {"error": f"{type(e).__name__}: {e}"}
        reply(proto, answer)


def main() -> None:
    spec = json.loads(sys.argv[1])
    proto = child_pipe()  # anything a library prints goes to stderr (the log)
    try:
        _serve(spec, proto)
    except Exception as e:
        traceback.print_exc()
        reply(proto, {"error": f"{type(e).__name__}: {e}"})
        sys.exit(1)


if __name__ == "__main__":
    main()
