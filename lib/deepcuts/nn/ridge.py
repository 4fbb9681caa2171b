"""``train.model = "ridge"``: a random CNN's pooled features, ridge-regressed onto the factors.

Issue 13: on a few hundred real recordings, Dieleman's CNN trained from scratch lost to the
MFCC bag-of-words baseline; an untrained, randomly initialised CNN's pooled features with a
linear model beat MFCCs on small datasets (Pons & Serra 2019).  So:

1. The conv stack of ``FactorCNN(kind="ridge")`` keeps its initialisation (``train.seed``).
2. Every training and validation track's *whole* stored excerpt (what infer scores, not a
   crop) goes through it on the executors; ``FactorCNN.pooled`` gives mean / max / rms over
   time of the normalised mel and of every conv block (3 x (n_mels + sum of channels)
   numbers: 2,688 at the defaults), and with ``train.transfer = "musicnn"`` the 1,970
   features of a pretrained network (:mod:`deepcuts.nn.pretrained`).
3. The executors sum the moments of (features, target) per split (``core.spark.sum_moments``):
   the driver receives d x d numbers (58 MB at d = 2,688, 174 MB at 4,658 with the
   pretrained features), never a track.
4. The driver standardises the features, takes one eigendecomposition of their correlation
   matrix, and solves ridge for every penalty of ``train.ridge_penalties`` (relative to the
   number of features, i.e. the trace of that matrix).  The penalty with the least
   validation loss wins (the validation loss of any linear model follows from the
   validation split's moments, exactly); without validation tracks, generalised cross-
   validation on the training tracks.
5. The standardisation is folded into the model's one linear layer, so the artifact is an
   ordinary ``FactorCNN`` state dict and infer, evaluate and the promotion gate serve it as
   they serve the CNN.

Cost: one forward pass of the conv stack over every training mel (no backward pass, no
epochs): ~0.1 core-s per 30 s excerpt here, so ~30 core-hours at 10^6 tracks and ~300 at
10^7, spread over the executors; the driver holds two d x d matrices whatever the catalogue.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from deepcuts.cf.baseline import cross_moments

MIN_STD = 1e-6     # features constant over the training tracks carry nothing: left at weight 0


@dataclass(frozen=True)
class RidgeFit:
    weights: np.ndarray            # [d, r] on the raw pooled features (standardisation folded in)
    intercept: np.ndarray          # [r]
    penalty: float                 # the chosen entry of train.ridge_penalties
    chosen_by: str                 # "validation" or "gcv"
    validation_loss: float | None  # mean squared error per output on the validation tracks
    train_loss: float
    losses: dict                   # penalty -> {"validation": ..., "gcv": ..., "train": ...}
    features: int                  # d
    used_features: int             # non-constant on the training tracks


def mse_from_moments(m: Mapping[str, np.ndarray], weights: np.ndarray, intercept: np.ndarray) -> float:
    """Mean over rows and outputs of (y - x W - b)^2, from ``cross_moments(x, y)`` alone."""
    n, r = float(m["n"]), weights.shape[1]
    cross = m["aa"] @ weights                                    # X^T X W
    predicted_sq = (np.sum(weights * cross) + 2.0 * float(m["sa"] @ weights @ intercept)
                    + n * float(intercept @ intercept))
    predicted_target = np.sum(weights * m["ab"]) + float(m["sb"] @ intercept)
    total = float(np.trace(m["bb"])) - 2.0 * predicted_target + predicted_sq
    return float(max(total, 0.0) / (n * r))


def fit(train: Mapping[str, np.ndarray], validation: Mapping[str, np.ndarray] | None,
        penalties: Sequence[float]) -> RidgeFit:
    """Ridge from pooled features to targets, from ``cross_moments`` of the two splits."""
    n = float(train["n"])
    if n < 2:
        raise ValueError("ridge needs at least two training tracks")
    if not penalties or min(penalties) <= 0:
        raise ValueError(f"train.ridge_penalties must be positive numbers, got {list(penalties)}")
    mean, y_mean = train["sa"] / n, train["sb"] / n
    std = np.sqrt(np.maximum(np.diag(train["aa"]) / n - mean ** 2, 0.0))
    used = std > MIN_STD * np.maximum(1.0, np.abs(mean))
    scale = np.where(used, std, 1.0)
    corr = (train["aa"] / n - np.outer(mean, mean)) / np.outer(scale, scale)
    corr[~used, :] = 0.0
    corr[:, ~used] = 0.0
    cross = (train["ab"] / n - np.outer(mean, y_mean)) / scale[:, None]
    cross[~used] = 0.0
    eigenvalues, vectors = np.linalg.eigh((corr + corr.T) / 2)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    projected = vectors.T @ cross                                # [d, r]
    trace = float(used.sum())
    losses, candidates = {}, {}
    for penalty in penalties:
        lam = float(penalty) * trace
        w_standard = vectors @ (projected / (eigenvalues + lam)[:, None])
        w_standard[~used] = 0.0          # rounding in the eigenvectors, not information
        weights = w_standard / scale[:, None]
        intercept = y_mean - (mean / scale) @ w_standard
        train_loss = mse_from_moments(train, weights, intercept)
        dof = float(np.sum(eigenvalues / (eigenvalues + lam)))
        gcv = train_loss / max(1e-12, (1.0 - dof / n)) ** 2 if dof < n else math.inf
        val_loss = mse_from_moments(validation, weights, intercept) if validation is not None else None
        losses[float(penalty)] = {"train": train_loss, "gcv": gcv, "validation": val_loss}
        candidates[float(penalty)] = (weights, intercept)
    chosen_by = "validation" if validation is not None and float(validation["n"]) > 0 else "gcv"
    best = min(losses, key=lambda p: losses[p][chosen_by])
    weights, intercept = candidates[best]
    return RidgeFit(weights=weights, intercept=intercept, penalty=best, chosen_by=chosen_by,
                    validation_loss=losses[best]["validation"], train_loss=losses[best]["train"],
                    losses=losses, features=len(mean), used_features=int(trace))


def stored_mel(mel_bytes, n_mels: int, n_frames: int) -> np.ndarray:
    """A training example's whole stored mel, float32 [n_mels, n_frames]."""
    return np.frombuffer(mel_bytes, dtype=np.float16).reshape(int(n_mels), int(n_frames)).astype(np.float32)


def pooled_features(model, mels: Sequence[np.ndarray], mel_mean: np.ndarray, mel_std: np.ndarray) -> np.ndarray:
    """[len(mels), pooled_dim] float64: ``model.pooled`` of each whole normalised mel (one at a
    time: excerpts differ in length), float32 arithmetic, no grad."""
    import torch
    from deepcuts.nn.model import normalise
    mean, std = torch.from_numpy(mel_mean), torch.from_numpy(mel_std)
    out = np.empty((len(mels), model.pooled_dim), dtype=np.float64)
    with torch.inference_mode():
        for i, mel in enumerate(mels):
            out[i] = model.pooled(normalise(torch.from_numpy(mel)[None], mean, std))[0].double().numpy()
    return out


def broadcast_model(df, weights: bytes, build):
    """A function the executors call for the model: ``build()`` (a FactorCNN of the right
    shape) loaded with ``weights`` (broadcast once), made once per Python worker."""
    weights_bc = df.sparkSession.sparkContext.broadcast(weights)
    cache: dict = {}

    def executor_model():
        import torch
        if "model" not in cache:
            torch.set_num_threads(1)      # one Spark task per core already
            net = build()
            net.load_state_dict(torch.load(io.BytesIO(weights_bc.value), map_location="cpu", weights_only=True))
            cache["model"] = net.eval()
        return cache["model"]
    return executor_model


def split_moments(examples_df, model, mel_mean: np.ndarray, mel_std: np.ndarray) -> dict | None:
    """``cross_moments(pooled features, target)`` summed over a training split's rows (a Spark
    frame of ``train_examples`` / ``validation_examples``) on the executors."""
    from deepcuts.core.spark import sum_moments
    from deepcuts.nn.model import FactorCNN, state_dict_bytes
    spec = dict(n_mels=model.n_mels, out_dim=model.out_dim, target=model.target, kind=model.kind,
                conv_channels=[m.out_channels for m in model.convs[0::3]],
                conv_kernel=int(model.convs[0].kernel_size[0]),
                pool_sizes=[int(m.kernel_size) for m in model.convs[2::3]], dense_units=1, dropout=0.0,
                pooling=model.pool.spread, transfer=model.transfer_name)
    executor_model = broadcast_model(examples_df, state_dict_bytes(model), lambda: FactorCNN(**spec))

    def partial(batch):
        mels = [stored_mel(m, a, f) for m, a, f in zip(batch["mel"], batch["n_mels"], batch["n_frames"])]
        targets = np.stack([np.asarray(t, dtype=np.float64) for t in batch["target"]])
        return cross_moments(pooled_features(executor_model(), mels, mel_mean, mel_std), targets)

    return sum_moments(examples_df.select("mel", "n_mels", "n_frames", "target"), partial)


def set_head(model, result: RidgeFit) -> None:
    """Write the fitted linear map into the model's output layer."""
    import torch
    with torch.no_grad():
        model.output.weight.copy_(torch.from_numpy(result.weights.T.astype(np.float32)))
        model.output.bias.copy_(torch.from_numpy(result.intercept.astype(np.float32)))


def excerpt_loss(examples_df, weights: bytes, meta: Mapping) -> float:
    """A model's (any kind's) mean squared error per output on the rows of ``examples_df``,
    each scored on its whole stored excerpt in float32, as infer scores it: the promotion
    gate's yardstick when a ridge model is one of the two compared (a ridge model is fitted
    on whole excerpts; the CNN's crop-based validation loss would not measure it fairly)."""
    from deepcuts.core.spark import sum_moments
    from deepcuts.nn.model import FactorCNN
    spec = {"train": dict(meta["train"]), "n_mels": int(meta["n_mels"]),
            "out_dim": int(meta.get("n_outputs", meta["out_dim"])),
            "mel_mean": np.asarray(meta["mel_mean"], dtype=np.float32),
            "mel_std": np.asarray(meta["mel_std"], dtype=np.float32)}
    executor_model = broadcast_model(examples_df, weights, lambda: FactorCNN.from_train_conf(
        spec["train"], n_mels=spec["n_mels"], out_dim=spec["out_dim"]))

    def partial(batch):
        import torch
        from deepcuts.nn.model import normalise
        mean, std = torch.from_numpy(spec["mel_mean"]), torch.from_numpy(spec["mel_std"])
        total, values = 0.0, 0
        with torch.inference_mode():
            for mel, n_mels, n_frames, target in zip(batch["mel"], batch["n_mels"], batch["n_frames"],
                                                     batch["target"]):
                x = normalise(torch.from_numpy(stored_mel(mel, n_mels, n_frames))[None], mean, std)
                error = executor_model()(x)[0].double().numpy() - np.asarray(target, dtype=np.float64)
                total, values = total + float(error @ error), values + len(error)
        return {"se": np.array(total), "values": np.array(float(values))}

    sums = sum_moments(examples_df.select("mel", "n_mels", "n_frames", "target"), partial)
    if sums is None or float(sums["values"]) == 0:
        raise ValueError("no validation rows to score")
    return float(sums["se"]) / float(sums["values"])
