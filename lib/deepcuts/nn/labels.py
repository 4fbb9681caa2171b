"""What a labels model (``train.target = "labels"``) gives a track, beside its embedding.

The model's penultimate layer is the track embedding (``FactorCNN.embed``); its output layer
is a multi-label head trained with BCE on multi-hot labels, so a label's probability is the
sigmoid of its logit, independently of the others.  These functions turn a batch of
embeddings (as ``Artifact.embed`` returns them) into the unit-normalised vectors stored in
``audio_embeddings`` and the top labels stored in ``predicted_labels``.  Pure numpy: the
executors and the tests call the same code.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def head_parameters(model) -> tuple[np.ndarray, np.ndarray]:
    """(weight [n_labels, dim], bias [n_labels]) of a labels model's output layer, float32."""
    if getattr(model, "target", None) != "labels":
        raise ValueError(f"model target {getattr(model, 'target', None)!r}: the label head needs a labels model")
    return (model.output.weight.detach().cpu().float().numpy().copy(),
            model.output.bias.detach().cpu().float().numpy().copy())


def label_probabilities(hidden: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """sigmoid(hidden @ weight.T + bias): [B, dim] -> [B, n_labels] (float64, no overflow)."""
    logits = np.asarray(hidden, dtype=np.float64) @ np.asarray(weight, dtype=np.float64).T + bias
    # exp of a large negative logit only underflows to 0: the stable sigmoid, both signs.
    out = np.empty_like(logits)
    pos = logits >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-logits[pos]))
    e = np.exp(logits[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def top_labels(probabilities: np.ndarray, names: Sequence[str], k: int) -> tuple[list[list[str]], list[np.ndarray]]:
    """Per row, the ``k`` most probable label names (most probable first; ties by name order)
    and their probabilities as float32."""
    p = np.asarray(probabilities, dtype=np.float64)
    k = min(int(k), p.shape[1])
    # A stable sort of -p keeps the vocabulary order among equal probabilities.
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    labels = [[names[j] for j in row] for row in order]
    probs = [p[i, row].astype(np.float32) for i, row in enumerate(order)]
    return labels, probs


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero: neighbours rejects it)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)
