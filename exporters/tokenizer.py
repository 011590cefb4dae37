"""Tokenizer assets of an export: `vocab.txt` and a Hugging Face `tokenizers` `tokenizer.json`.

The `tokenizer.json` reproduces the KerasHub DistilBERT preprocessor (BERT normalisation and
pre-tokenisation, WordPiece, `[CLS] text [SEP]`, truncation to `sequence_length`); export
verification checks that both give identical token ids on real texts.
"""

from __future__ import annotations

from pathlib import Path


def build_tokenizer_json(
    vocabulary: list[str], lowercase: bool, strip_accents: bool, sequence_length: int, path: Path
) -> Path:
    """Writes a `tokenizer.json` equivalent to KerasHub's WordPiece tokenizer + preprocessor.

    Args:
        vocabulary: the WordPiece vocabulary, index = token id.
        lowercase: lowercase the input (uncased models).
        strip_accents: remove accents after NFD normalisation.
        sequence_length: maximum ids per text, `[CLS]` and `[SEP]` included.
        path: file to write.

    Returns:
        `path`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(vocabulary)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.enable_truncation(max_length=sequence_length)
    tok.enable_padding(pad_id=vocab["[PAD]"], pad_token="[PAD]")
    tok.save(str(path))
    return path


def write_tokenizer_assets(keras_tokenizer, sequence_length: int, out_dir: Path) -> list[str]:
    """Writes `vocab.txt` and `tokenizer.json` for a KerasHub WordPiece tokenizer.

    Returns:
        The file names written.
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
    return ["vocab.txt", "tokenizer.json"]
