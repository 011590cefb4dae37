"""Packs what the GPU run needs onto a machine that reaches no package registry (`.gpu/`).

    python -m kerasft.benchmarks.gpu.pack --data ../shared/data/sarcasm_headlines_v1.jsonl
    # then, on the device machine, from the repository root:
    bash benchmarks/gpu/device.sh

`.gpu/` (ignored by git) gets:
- `wheels/`: keras, keras-hub and the pure-Python packages they need that the device image
  lacks (`WHEELS`), for CPython 3.12 on manylinux x86-64, downloaded with `pip download
  --no-deps`; TensorFlow is not among them: the run trains on torch and JAX only;
- `minilm-fp16/`: the offline preset's DistilBERT checkpoint (all-MiniLM-L6-v2 with token-type
  row 0 folded in) with float16 weights: the float32 file is 91 MB, over the 64 MiB a device
  call carries; `--unpack` turns it back into a float32 checkpoint there (the weights then
  differ from the CPU runs' by float16 rounding, about 1e-3 relative);
- `data/`: the data file (the repository's `../shared` does not travel).

It refuses to leave more than `LIMIT_MIB` in `.gpu/` and prints what it holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kerasft.model.presets import minilm_source_dir, write_distilbert_checkpoint

# What the device image lacks (its package list: the device tool's KINDS.md).
WHEELS = ("keras==3.15.1", "keras-hub==0.32.0", "namex==0.1.0", "optree==0.20.0",
          "kagglehub==1.0.2", "kagglesdk==0.1.28")  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
LIMIT_MIB = 60


def download_wheels(out: Path) -> list[Path]:
    """`pip download --no-deps` of `WHEELS` for the device's Python (3.12, x86-64 Linux)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "-d",
        str(out),
        "-q",
    ]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + list(WHEELS), check=True)  # fmt: skip
    return sorted(out.glob("*.whl"))


def write_fp16_checkpoint(out: Path) -> Path:
    """The offline preset's DistilBERT checkpoint with float16 weights."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = write_distilbert_checkpoint(minilm_source_dir(), Path(tmp) / "fp32")
        return cast_checkpoint(fp32, out, "float16")


def unpack(fp16_dir: Path, out: Path) -> Path:
    """A float32 copy of a `write_fp16_checkpoint` directory (on the device)."""
    return cast_checkpoint(fp16_dir, out, "float32")


def cast_checkpoint(source: Path, out: Path, dtype: str) -> Path:
    """A copy of a checkpoint directory with `model.safetensors` cast to `dtype`."""
    from safetensors.numpy import load_file, save_file

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(source / "model.safetensors")
    save_file({k: v.astype(dtype) for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the data file to carry")
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    parser.add_argument(
        "--unpack",
        nargs=2,
        type=Path,
        metavar=("FP16_DIR", "OUT"),
        help="on the device: write a float32 checkpoint; prints its path",
    )
    args = parser.parse_args(argv)
    if args.unpack:
        print(unpack(*args.unpack))
        return 0
    if not args.data or not Path(args.data).is_file():
        parser.error(f"--data: no such file {args.data!r}")
    wheels = download_wheels(args.out / "wheels")
    write_fp16_checkpoint(args.out / "minilm-fp16")
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy2(args.data, args.out / "data" / Path(args.data).name)
    files = [p for p in args.out.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    listing = {str(p.relative_to(args.out)): p.stat().st_size for p in sorted(files)}
    print(json.dumps({"wheels": [w.name for w in wheels], "files": listing,
                      "total_mib": round(total / 2**20, 1)}, indent=1))  # fmt: skip
    if total > LIMIT_MIB * 2**20:
        print(f"error: {args.out} holds {total / 2**20:.1f} MiB, over {LIMIT_MIB}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
