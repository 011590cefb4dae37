"""Test-only: on `PYTHONPATH`, every `DistilBertTextClassifier` this interpreter builds has no
head dropout, so that runs over different process counts (whose dropout masks cannot match)
train step for step alike. Used with the no-dropout tiny preset by `test_distribute.py`; every
process a launcher starts imports it too. It imports Keras at start-up, so `KERAS_BACKEND` must
be set in the environment (a `--backend` flag would come too late)."""

import keras_hub

_init = keras_hub.models.DistilBertTextClassifier.__init__


def _no_dropout(self, *args, **kwargs):
    kwargs["dropout"] = 0.0
    _init(self, *args, **kwargs)


keras_hub.models.DistilBertTextClassifier.__init__ = _no_dropout
