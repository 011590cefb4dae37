"""An independent pure-NumPy forward pass of a Hugging Face BERT encoder (test reference only).

Written from the BERT paper / `BertModel` layout, sharing no code with KerasHub or kerasft: it reads
the original checkpoint tensors (token-type embeddings included) and returns the last hidden states.
"""

import numpy as np
from scipy.special import erf


def _layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _dense(x, t, name):
    return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]


def bert_forward(t: dict, config: dict, token_ids: np.ndarray) -> np.ndarray:
    """Returns BERT's last hidden states, shape (len, hidden), for one unpadded sequence."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    eps = config["layer_norm_eps"]
    n = len(token_ids)
    x = (
        t["embeddings.word_embeddings.weight"][token_ids]
        + t["embeddings.position_embeddings.weight"][:n]
        + t["embeddings.token_type_embeddings.weight"][np.zeros(n, dtype=int)]
    )
    x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    heads = config["num_attention_heads"]
    d = config["hidden_size"] // heads
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"

        def split(y):
            return y.reshape(n, heads, d).transpose(1, 0, 2)

        q = split(_dense(x, t, f"{p}.attention.self.query"))
        k = split(_dense(x, t, f"{p}.attention.self.key"))
        v = split(_dense(x, t, f"{p}.attention.self.value"))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        ctx = (scores / scores.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(1, 0, 2).reshape(n, heads * d)
        attn = _dense(ctx, t, f"{p}.attention.output.dense")
        x = _layer_norm(
            x + attn,
            t[f"{p}.attention.output.LayerNorm.weight"],
            t[f"{p}.attention.output.LayerNorm.bias"],
            eps,
        )
        h = _dense(x, t, f"{p}.intermediate.dense")
        h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
        x = _layer_norm(
            x + _dense(h, t, f"{p}.output.dense"),
            t[f"{p}.output.LayerNorm.weight"],
            t[f"{p}.output.LayerNorm.bias"],
            eps,
        )
    return x
