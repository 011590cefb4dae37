"""Tokenizer assets of an export: `vocab.txt` and a Hugging Face `tokenizers` `tokenizer.json`.

The `tokenizer.json` is `kerasft.tokens.wordpiece.rust_tokenizer`, the twin of the KerasHub
DistilBERT preprocessor that training uses too; export verification checks that both give identical
token ids on real texts.
"""

from __future__ import annotations

from pathlib import Path

from kerasft.tokens.wordpiece import rust_tokenizer


def build_tokenizer_json(
    vocabulary: list[str],
    lowercase: bool,
    strip_accents: bool,
    sequence_length: int,
    path: Path,
) -> Path:
    """Writes `rust_tokenizer(...)` as a `tokenizer.json` (export verification checks it).

    Args:
        vocabulary, lowercase, strip_accents, sequence_length: see `rust_tokenizer`.
        path: file to write.

    Returns:
        `path`.
    """
    rust_tokenizer(vocabulary, lowercase, strip_accents, sequence_length).save(str(path))
    return path


def write_tokenizer_assets(keras_tokenizer, sequence_length: int, out_dir: Path) -> dict:
    """Writes `vocab.txt` and `tokenizer.json` for a KerasHub WordPiece tokenizer.

    Returns:
        The tokenizer settings for the manifest (`lowercase`, `strip_accents`).
    """
    vocabulary = list(keras_tokenizer.get_vocabulary())
    (out_dir / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    build_tokenizer_json(
        vocabulary,
        lowercase=bool(keras_tokenizer.lowercase),
        strip_accents=bool(keras_tokenizer.strip_accents),
        sequence_length=sequence_length,
        path=out_dir / "tokenizer.json",
    )
    return {
        "lowercase": bool(keras_tokenizer.lowercase),
        "strip_accents": bool(keras_tokenizer.strip_accents),
    }
