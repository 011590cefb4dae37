"""The export runtime tokenizes exactly like the KerasHub preprocessor of the model."""

import json

import keras
import numpy as np
import pytest
from test_tf_free import REFERENCE_IDS_SHA256, ids_digest

from kerasft.benchmarks.tokenizer_speed import typographic
from kerasft.exporters.runtime import ExportedClassifier, sha256_file
from kerasft.exporters.tokenizer import write_tokenizer_assets
from kerasft.tokens.wordpiece import tokenizers_matches

HARD_TEXTS = [
    "grab them by the… hand: trump's nonverbal behavior",  # "…" folds to "..." after the split
    "historical archives: iroquois inſurgency quelled by gov't.!",  # long s folds to "s"
    "Ｆｕｌｌｗｉｄｔｈ letters",
    "Straße naïve café ﬁne",
    "film\u00a0reveals",  # no-break space stays inside the word -> [UNK]
    "americans\u200bnations",  # zero-width space splits
    "control\x99char and soft\u00adhyphen",
    "漢字テスト and emoji 😀",
    "x" * 150,
    "é" * 60,
    "  lead and trail  ",
    "ΣΊΣΥΦΟΣ",
    "ΟΔΟΣ στο σπίτι",  # a final capital sigma lowercases by context
    "naïve café – “quoted” and ‘single’ — done €5",  # plain: tokenizer.json alone is exact
]


@pytest.fixture(scope="module")
def preprocessor():
    import keras_hub

    from kerasft.model.presets import minilm_source_dir

    tokenizer = keras_hub.models.DistilBertTokenizer(
        vocabulary=str(minilm_source_dir() / "vocab.txt"), lowercase=True
    )
    return keras_hub.models.DistilBertTextClassifierPreprocessor(tokenizer, sequence_length=24)


def test_runtime_matches_kerashub(preprocessor, sarcasm_file, tmp_path):
    settings = write_tokenizer_assets(preprocessor.tokenizer, 24, tmp_path)
    files = {name: sha256_file(tmp_path / name) for name in ("tokenizer.json", "vocab.txt")}
    manifest = {"label_names": ["0", "1"], "tokenizer": settings, "sequence_length": 24,
                "model_file": "vocab.txt", "files": files}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    runtime = ExportedClassifier(tmp_path)
    rows = [json.loads(line)["headline"] for line in sarcasm_file.open()]
    curly = [typographic(r) for r in rows if "'" in r or '"' in r or " - " in r][:3000]
    # Typographic news text takes the fast path (tokenizer.json alone), and it is exact; only
    # the one headline with a no-break space (NFKC turns it into a space) takes the exact path.
    slow = [t for t in curly if not tokenizers_matches(t, **settings)]
    assert len(curly) == 3000 and len(slow) == 1 and "\xa0" in slow[0]
    assert not any(tokenizers_matches(t, **settings) for t in HARD_TEXTS[:4] + HARD_TEXTS[-3:-1])
    texts = HARD_TEXTS + rows[:3000] + curly + [r for r in rows if not r.isascii()]
    expected = preprocessor(texts)
    ids = keras.ops.convert_to_numpy(expected["token_ids"])
    mask = keras.ops.convert_to_numpy(expected["padding_mask"]).astype(bool)
    got = runtime.encode(texts)
    width = got["token_ids"].shape[1]
    assert width == mask.sum(1).max()  # padded to the longest text only
    for i, text in enumerate(texts):
        want = ids[i][mask[i]].tolist()
        have = got["token_ids"][i][got["padding_mask"][i].astype(bool)].tolist()
        assert have == want, (text, have, want)
    assert np.array_equal(got["padding_mask"].sum(1), mask.sum(1))


@pytest.mark.slow
def test_training_tokenizer_gives_kerashub_ids_on_the_whole_file(sarcasm_file):
    """Training tokenizes with the Rust `tokenizers` path where it is exact (`tokenize`); on
    every sarcasm headline, typographic variants and the hard cases, the ids must be
    KerasHub's preprocessor's (`kerashub_tokenize`), at the reference sequence length."""
    import keras_hub

    from kerasft.model.presets import minilm_source_dir
    from kerasft.tokens.batching import fast_tokenizer, kerashub_tokenize, tokenize

    tokenizer = keras_hub.models.DistilBertTokenizer(
        vocabulary=str(minilm_source_dir() / "vocab.txt"), lowercase=True
    )
    preprocessor = keras_hub.models.DistilBertTextClassifierPreprocessor(tokenizer)
    assert fast_tokenizer(preprocessor) is not None
    rows = [json.loads(line)["headline"] for line in sarcasm_file.open()]
    texts = rows + [typographic(r) for r in rows[:2000]] + HARD_TEXTS
    fast, exact = tokenize(preprocessor, texts), kerashub_tokenize(preprocessor, texts)
    assert fast.flat.dtype == np.uint16 and len(fast) == len(texts) == 26709 + 2000 + 14
    assert np.array_equal(fast.lengths, exact.lengths)
    assert np.array_equal(fast.flat, exact.flat)
    # the digest the TensorFlow-free environment checks its ids against (test_tf_free)
    assert ids_digest(tokenize(preprocessor, rows)) == REFERENCE_IDS_SHA256
