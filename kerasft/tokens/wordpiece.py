"""KerasHub's DistilBERT WordPiece tokenization without TensorFlow: the Rust `tokenizers` twin
and the exact pre-tokenisation rules, shared by training and the export runtime.

`rust_tokenizer` reproduces the KerasHub DistilBERT preprocessor (BERT normalisation and
pre-tokenisation, WordPiece, `[CLS] text [SEP]`, truncation to `sequence_length`);
`tokenizers_matches` says for which texts its ids are KerasHub's, and `kerashub_words` splits
the others exactly as KerasHub does; `token_ids` puts the two together. Training
(`kerasft.tokens.batching`) and the export runtime both tokenize with it, so neither needs
TensorFlow. Exports ship the tokenizer as `tokenizer.json` (`kerasft.exporters.tokenizer`),
whose verification checks identical ids on real texts; a test checks training's ids against
KerasHub's preprocessor on every reference headline.
"""

from __future__ import annotations

import functools
import re
import unicodedata

# KerasHub's WordPiece pre-tokenisation (keras_hub/src/tokenizers/word_piece_tokenizer.py),
# in the Oniguruma syntax `tokenizers` uses. RE2's `\s` (KerasHub) is ASCII-only, so no-break
# and other Unicode spaces stay inside words there, as they do here.
_WHITESPACE = r"[\t\n\f\r ]|\p{Cc}|\p{Cf}"
_PUNCTUATION = r"[!-/]|[:-@]|[\[-`]|[{-~]|\p{P}"
_CJK = (
    r"[\x{4E00}-\x{9FFF}]|[\x{3400}-\x{4DBF}]|[\x{20000}-\x{2A6DF}]|[\x{2A700}-\x{2B73F}]"
    r"|[\x{2B740}-\x{2B81F}]|[\x{2B820}-\x{2CEAF}]|[\x{F900}-\x{FAFF}]|[\x{2F800}-\x{2FA1F}]"
)


def rust_tokenizer(
    vocabulary: list[str], lowercase: bool, strip_accents: bool, sequence_length: int
):
    """A `tokenizers.Tokenizer` that tokenizes like KerasHub's WordPiece tokenizer + preprocessor.

    KerasHub splits on ASCII whitespace and on control/format characters (dropping them),
    isolates punctuation and CJK characters, then lowercases and runs WordPiece; a word it cannot
    cover becomes `[UNK]`. The same steps are expressed with `tokenizers` components here.
    (KerasHub lowercases with NFKC case folding, this with plain lowercasing: they differ only
    for rare characters such as ligatures; `tokenizers_matches` says where the ids are equal.)

    Args:
        vocabulary: the WordPiece vocabulary, index = token id.
        lowercase: lowercase the input (uncased models).
        strip_accents: remove accents after NFD normalisation.
        sequence_length: maximum ids per text, `[CLS]` and `[SEP]` included.

    Returns:
        A `tokenizers.Tokenizer` (truncating to `sequence_length`, padding to the longest).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(vocabulary)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    steps = [normalizers.NFD(), normalizers.StripAccents()] if strip_accents else []
    steps += [normalizers.Lowercase()] if lowercase else []
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_WHITESPACE), behavior="removed"),
            pre_tokenizers.Split(Regex(f"{_PUNCTUATION}|{_CJK}"), behavior="isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.enable_truncation(max_length=sequence_length)
    tok.enable_padding(pad_id=vocab["[PAD]"], pad_token="[PAD]")
    return tok


# --- exact KerasHub pre-tokenisation for non-ASCII text (standard library only) -------------

_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip
_IGNORABLE = {0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFFA0}


def _is_ignorable(ch: str) -> bool:
    o = ord(ch)
    return (
        o in _IGNORABLE
        or 0x180B <= o <= 0x180F
        or 0xFE00 <= o <= 0xFE0F
        or 0xE0000 <= o <= 0xE0FFF
        or unicodedata.category(ch) == "Cf"
    )


def _casefold(word: str) -> str:
    """`tf_text.case_fold_utf8`: NFKC_Casefold, dropping default-ignorable code points."""
    word = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", word).casefold())
    return "".join(c for c in word if not _is_ignorable(c))


def kerashub_words(text: str, lowercase: bool, strip_accents: bool) -> list[str]:
    """Splits `text` into words exactly as KerasHub's WordPiece tokenizer does.

    ASCII whitespace and control/format characters separate words and are dropped; ASCII
    symbols, Unicode punctuation and CJK characters are words of their own; each word is then
    NFKC-case-folded (when `lowercase`). Unlike a `tokenizers` normalizer, the folding happens
    after the split, so "…" stays one word and becomes "...".
    """
    if strip_accents:
        text = unicodedata.normalize("NFD", text)
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words, current = [], []
    for ch in text:
        o, category = ord(ch), unicodedata.category(ch)
        if ch in "\t\n\f\r " or category in ("Cc", "Cf"):
            split, keep = True, False
        elif (
            33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126
            or category.startswith("P") or any(lo <= o <= hi for lo, hi in _CJK_RANGES)
        ):  # fmt: skip
            split, keep = True, True
        else:
            split = keep = False
        if split:
            if current:
                words.append("".join(current))
                current = []
            if keep:
                words.append(ch)
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    if lowercase:
        words = [_casefold(w) for w in words]
    return [w for w in words if w]


# --- when tokenizer.json is already exact on non-ASCII text ---------------------------------

# A word KerasHub sees is at most this many characters when every character may take 4 UTF-8
# bytes; longer runs between ASCII whitespace may pass KerasHub's 100-byte limit (then `[UNK]`).
_LONG_RUN = re.compile(r"[^\t\n\f\r ]{26,}")


@functools.lru_cache(maxsize=4096)
def _plain(ch: str) -> bool:
    """Whether `ch` tokenizes the same with `tokenizer.json` (lowercase the whole text, then
    split) as with KerasHub (split, then NFKC-case-fold each word): it must be NFKC-stable,
    lowercase to its case fold, be no combining mark (NFKC would compose it with its
    neighbour) and not be dropped as default-ignorable. Curly quotes, dashes, the euro sign and
    most accented letters are plain; ligatures, `…`, full-width forms and `ß` are not."""
    return (
        ch != "\u03a3"  # capital sigma lowercases by context (final sigma); KerasHub folds to σ
        and not unicodedata.category(ch).startswith("M")
        and not _is_ignorable(ch)
        and unicodedata.normalize("NFKC", ch) == ch
        and _casefold(ch) == ch.lower()
    )


def tokenizers_matches(text: str, lowercase: bool, strip_accents: bool) -> bool:
    """Whether `tokenizer.json` gives KerasHub's token ids for `text` without the exact path.

    True for ASCII text, and for other text whose non-ASCII characters are all `_plain` (when
    the tokenizer lowercases and keeps accents, as uncased DistilBERT does) with no run of more
    than 25 characters between ASCII whitespace. Export verification checks the result on real
    texts; a test checks it against KerasHub on the sarcasm file with typographic quotes and
    dashes and on a list of hard cases.
    """
    if text.isascii():
        return True
    if strip_accents or _LONG_RUN.search(text):
        return False
    if not lowercase:
        return True
    return all(_plain(ch) for ch in text if ch > "\x7f")


# --- both together: KerasHub's ids for any text ----------------------------------------------

# KerasHub's FastWordpiece gives `[UNK]` for a word of more than this many UTF-8 bytes.
MAX_WORD_BYTES = 100


def exact_ids(tokenizer, text: str, lowercase: bool, strip_accents: bool, sequence_length: int):
    """KerasHub's ids for one text through its exact pre-tokenisation (`kerashub_words`) and the
    WordPiece model of `tokenizer` (a `rust_tokenizer`), `[CLS]` and `[SEP]` included, cut to
    `sequence_length`."""
    unk = tokenizer.token_to_id("[UNK]")
    ids = []
    for word in kerashub_words(text, lowercase, strip_accents):
        if len(word.encode("utf-8")) > MAX_WORD_BYTES:
            ids.append(unk)
        else:
            ids += [t.id for t in tokenizer.model.tokenize(word)]
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    return [cls, *ids[: sequence_length - 2], sep]


def token_ids(
    tokenizer, texts: list[str], lowercase: bool, strip_accents: bool, sequence_length: int
) -> list[list[int]]:
    """KerasHub's ids for `texts`, unpadded: the Rust tokenizer where `tokenizers_matches`, the
    exact path (`exact_ids`) for the rest.

    Args:
        tokenizer: a `rust_tokenizer` (its padding is ignored; truncation must be
            `sequence_length`).
        texts: the texts.
        lowercase: the WordPiece tokenizer's `lowercase`.
        strip_accents: its `strip_accents`.
        sequence_length: maximum ids per text, `[CLS]` and `[SEP]` included.

    Returns:
        One list of ids per text.
    """
    rows = [e.ids for e in tokenizer.encode_batch(texts)]
    for i, text in enumerate(texts):
        if not tokenizers_matches(text, lowercase, strip_accents):
            rows[i] = exact_ids(tokenizer, text, lowercase, strip_accents, sequence_length)
    return rows
