"""The export directory: what `kerasft export` leaves behind, written, read and checked in one
place (the counterpart of `kerasft.runs.rundir`).

An export directory holds the model file(s), the tokenizer assets, the model card
(`README.md`) and `manifest.json`: the format, quantization, label names, sequence length,
verification numbers, and the sha256 of every other file. This module owns the manifest:
`write_manifest` lists and hashes the files, `read_manifest` checks every file against it (and
the manifest against a pinned hash) before anything is loaded. It imports only the standard
library, so the dependency-light runtime uses it too.

Example:
    >>> from kerasft.exporters import exportdir
    >>> manifest = exportdir.read_manifest("exports/sarcasm-onnx-int8")
    >>> manifest["quantization"], manifest["verification"]["label_agreement"]
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"  # not counted in `size_bytes`
TOKENIZER_FILE = "tokenizer.json"


class IntegrityError(ValueError):
    """An export directory failed its checks: a file differs from its sha256 in the manifest, a
    file is missing or unlisted, a path leaves the directory, or the manifest is not the pinned
    one. The message names the file and what was expected."""


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inside(export_dir: Path, name: str, what: str) -> Path:
    """`export_dir / name`, refused unless `name` is a relative path that stays inside."""
    parts = PurePosixPath(name).parts
    if not name or name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in parts:
        raise IntegrityError(
            f"{export_dir}: manifest {what} {name!r} is not a relative path inside the export "
            "directory; refusing to load it."
        )
    path = export_dir / name
    if not path.resolve().is_relative_to(export_dir.resolve()):
        raise IntegrityError(
            f"{export_dir}: manifest {what} {name!r} resolves outside the export directory "
            f"({path.resolve()}); refusing to load it."
        )
    return path


def label_strings(label_names: list) -> list[str]:
    """The label names as every export stores them: strings, which must stay distinct.

    Raises:
        ValueError: naming the names that become the same string.
    """
    names = [str(name) for name in label_names]
    if len(set(names)) == len(names):
        return names
    clash: dict[str, list] = {}
    for name in label_names:
        clash.setdefault(str(name), []).append(name)
    clash = {k: v for k, v in clash.items() if len(v) > 1}
    raise ValueError(
        f"Label names must stay distinct as strings: {clash} collide. Received: "
        f"label_names={list(label_names)!r}"
    )


def read_manifest(export_dir: str | Path, manifest_sha256: str | None = None) -> dict:
    """Reads and checks an export's `manifest.json` and every file it lists.

    Args:
        export_dir: the export directory.
        manifest_sha256: when given, the manifest's own sha256 must equal it (what
            `kerasft export` printed): a deployment pins it to detect an edited manifest.

    Returns:
        The manifest.

    Raises:
        FileNotFoundError: if `export_dir` has no `manifest.json`.
        IntegrityError: a pinned manifest that differs, a listed file that is missing or whose
            sha256 differs, a path that leaves the directory, or a model file the manifest does
            not list.
    """
    export_dir = Path(export_dir)
    manifest_path = export_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"No manifest.json in {str(export_dir)!r}: not an export directory."
        )
    raw = manifest_path.read_bytes()
    if manifest_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != manifest_sha256.lower():
            raise IntegrityError(
                f"{manifest_path}: sha256 {digest} differs from the pinned manifest_sha256="
                f"{manifest_sha256}; the manifest was edited or replaced. Refusing to load it."
            )
    manifest = json.loads(raw)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise IntegrityError(f"{manifest_path}: lists no files with their sha256; not loadable.")
    for key, path in (("model_file", manifest.get("model_file")),
                      ("tokenizer_file", tokenizer_file(manifest))):  # fmt: skip
        if not isinstance(path, str):
            raise IntegrityError(f"{manifest_path}: {key}={path!r} is not a path.")
        _inside(export_dir, path, key)
        if path not in files and not any(n.startswith(f"{path}/") for n in files):
            raise IntegrityError(
                f"{export_dir}: {key} {path!r} is not among the files the manifest lists with a "
                f"sha256 ({sorted(files)[:8]}); refusing to load an unlisted file."
            )
    for name, expected in files.items():
        path = _inside(export_dir, name, "file")
        if not path.is_file():
            raise IntegrityError(f"{export_dir}: {name} is listed in the manifest but missing.")
        digest = sha256_file(path)
        if digest != expected:
            raise IntegrityError(
                f"{export_dir}: {name} has sha256 {digest}, the manifest says {expected}: the "
                "file was changed or corrupted. Refusing to load it."
            )
    return manifest


def tokenizer_file(manifest: dict) -> str:
    """The export's `tokenizers` file, relative to it (`tokenizer.json` unless the format keeps
    a file of that name for itself, as a KerasHub preset does)."""
    return manifest.get("tokenizer_file") or TOKENIZER_FILE


def is_export(directory: str | Path) -> bool:
    """Whether `directory` is a (complete: exports publish atomically) export directory."""
    return (Path(directory) / MANIFEST_FILE).is_file()


def manifest_format(export_dir: str | Path) -> str | None:
    """The `format` an export's manifest names (read before the files are checked, to pick the
    runtime that checks them).

    Raises:
        FileNotFoundError: `export_dir` has no `manifest.json`.
    """
    return _read_raw(Path(export_dir)).get("format")


def variant(manifest: dict) -> str:
    """An export's variant as users see it named: its `quantization` (e.g. `"int8-nncf"`), or
    `"fp32"` for an unquantized one (`quantization` null).

    Example:
        >>> variant({"quantization": None})
        'fp32'
    """
    return manifest["quantization"] or "fp32"


def manifest_sha256(export_dir: str | Path) -> str:
    """The sha256 of an export's `manifest.json`: the value to pin (`manifest_sha256=`)."""
    return sha256_file(Path(export_dir) / MANIFEST_FILE)


def write_manifest(directory: str | Path, manifest: dict) -> dict:
    """Lists every file but the manifest with its sha256, then writes `manifest.json`.

    `size_bytes` is the size of the files a deployment ships (the model card left out).

    Returns:
        The manifest written (`manifest` with `files` and `size_bytes` set).
    """
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    manifest["files"] = {str(p.relative_to(directory)): sha256_file(p) for p in files}
    manifest["size_bytes"] = sum(p.stat().st_size for p in files if p.name != CARD_FILE)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read_raw(export_dir: Path) -> dict:
    path = export_dir / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No {MANIFEST_FILE} in {str(export_dir)!r}: not an export directory."
        )
    return json.loads(path.read_text())
