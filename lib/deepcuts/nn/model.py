"""The audio model and its artifact: shared by training (writes it) and inference (reads it).

``FactorCNN`` follows Dieleman (2014): 1-D convolutions over time with the mel bands as
channels, max-pooling in time, a global temporal pooling layer (mean, max and L2-norm over
time, concatenated), two dense layers and a linear output.  Pooling is global, so any
number of frames >= ``min_frames`` goes through the same model: a 3 s training crop and a
whole 30 s excerpt alike.  The L2 norm grows with sqrt(frames), though, so a model trained on
3 s crops sees a whole excerpt's norm ~3x larger than any it learnt from; ``train.pooling =
"rms"`` divides it by sqrt(frames) and makes every pooled statistic length-free.

Two kinds (``train.model``):

* ``"cnn"``: the above, trained end to end by SGD on random crops (``stages.train``).
* ``"ridge"``: the same conv stack left at its random initialisation (Pons & Serra 2019:
  an untrained CNN's pooled features beat MFCCs on small datasets), the normalised mel and
  every conv block pooled over time (mean, max, root-mean-square: length-independent, so a
  30 s excerpt and a 3 s window give comparable features), and one linear layer fitted in
  closed form by ridge regression (:mod:`deepcuts.nn.ridge`).  The mel's pooled bands carry
  the MFCC statistics linearly (an MFCC is a DCT of the log-mel).  With ``train.transfer =
  "musicnn"`` the features of a pretrained music network are appended
  (:class:`deepcuts.nn.pretrained.TransferFeatures`, weights carried in the artifact).

Artifact layout under the warehouse root::

    models/<model_id>/model.pt     torch.save of the state dict only (loaded with weights_only)
    models/<model_id>/meta.json    everything needed to rebuild and use the module
    models/LATEST                  the newest model id, replaced after both files are complete

``meta.json`` records the SHA-256 of ``model.pt``: a truncated or corrupted weights file is
refused with a ``ModelArtifactError`` that names the file, never half-loaded.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import math
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from deepcuts.core.errors import InputMissing
from deepcuts.core.storage import read_bytes, write_bytes_atomic

MODELS_DIR = "models"
LATEST = "LATEST"
WEIGHTS_FILE = "model.pt"
META_FILE = "meta.json"
ARTIFACT_FORMAT = 1
TARGETS = ("factors", "labels")
MODEL_KINDS = ("cnn", "ridge")
SPREADS = ("l2", "rms")       # the third pooled statistic (pool_over_time)


class ModelArtifactError(InputMissing):
    """A model artifact is missing, truncated, corrupted or does not match its metadata: an
    unusable input (exit 3), named by its folder; nothing was published."""


# --- mels ---------------------------------------------------------------------------------
def frames_for_seconds(seconds: float, sample_rate: int, hop_length: int) -> int:
    """Mel frames covering ``seconds`` of audio (librosa's centred frames: 1 + samples // hop)."""
    return 1 + int(round(seconds * sample_rate)) // hop_length


def min_frames(conv_kernel: int, pool_sizes: Sequence[int]) -> int:
    """The fewest input frames that leave at least one frame after every conv and pool."""
    frames = 1
    for pool in reversed(list(pool_sizes)):
        frames = frames * pool + conv_kernel - 1
    return frames


def normalise(mels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-band standardisation: [B, n_mels, T] with mean/std of shape [n_mels]."""
    return (mels - mean[None, :, None]) / std[None, :, None]


# --- the network --------------------------------------------------------------------------
def pool_over_time(x: torch.Tensor, dim: int, spread: str = "l2") -> torch.Tensor:
    """Mean, max and L2-norm (``spread="l2"``, Dieleman) or root-mean-square (``"rms"``: the
    L2 norm / sqrt(frames), which does not grow with the excerpt's length) over ``dim``,
    concatenated along dim 1 (the channels), in float32: the L2 norm of a long excerpt
    overflows float16."""
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=dim)
    if spread == "rms":
        norm = norm / math.sqrt(x.shape[dim])
    return torch.cat([x.mean(dim=dim), x.amax(dim=dim), norm], dim=1)


class GlobalTemporalPooling(nn.Module):
    """Concatenate mean, max and L2-norm (or rms) over time: [B, C, T] -> [B, 3C] (Dieleman 2014)."""

    def __init__(self, spread: str = "l2"):
        super().__init__()
        if spread not in SPREADS:
            raise ValueError(f"pooling {spread!r}: expected one of {SPREADS}")
        self.spread = spread

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_over_time(x, dim=2, spread=self.spread)


class FactorCNN(nn.Module):
    """Mel spectrogram [B, n_mels, T] -> latent factors (or label logits) [B, out_dim].

    ``kind="cnn"``: Dieleman's network (module docstring).  ``kind="ridge"``: the conv stack
    is not trained; ``pooled`` concatenates the pooled input and every conv block, and
    ``output`` is the linear ridge solution on those features (no dense layers)."""

    def __init__(self, n_mels: int, out_dim: int, conv_channels: Sequence[int], conv_kernel: int,
                 pool_sizes: Sequence[int], dense_units: int, dropout: float, target: str = "factors",
                 kind: str = "cnn", pooling: str = "l2", transfer: str = "none"):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target {target!r}: expected one of {TARGETS}")
        if kind not in MODEL_KINDS:
            raise ValueError(f"model kind {kind!r}: expected one of {MODEL_KINDS}")
        if kind == "ridge" and target != "factors":
            raise ValueError("a ridge model regresses factors; a labels target needs the cnn")
        from deepcuts.nn.pretrained import FEATURES, NETWORKS, TransferFeatures
        if transfer not in NETWORKS:
            raise ValueError(f"transfer {transfer!r}: expected one of {NETWORKS}")
        if transfer != "none" and kind != "ridge":
            raise ValueError("pretrained features feed the ridge model; the cnn trains its own")
        if len(conv_channels) != len(pool_sizes):
            raise ValueError("one pool size per conv layer is needed")
        self.target, self.kind, self.transfer_name = target, kind, transfer
        self.n_mels = n_mels
        self.out_dim = out_dim
        self.min_frames = min_frames(conv_kernel, pool_sizes)
        layers: list[nn.Module] = []
        in_channels = n_mels
        for channels, pool in zip(conv_channels, pool_sizes):
            layers += [nn.Conv1d(in_channels, channels, conv_kernel), nn.ReLU(), nn.MaxPool1d(pool)]
            in_channels = channels
        self.convs = nn.Sequential(*layers)
        # A ridge model pools rms always: its features must not grow with the excerpt's length.
        self.pool = GlobalTemporalPooling("rms" if kind == "ridge" else pooling)
        self.transfer = TransferFeatures(n_mels) if transfer != "none" else None
        if kind == "ridge":
            self.pooled_dim = 3 * (n_mels + sum(conv_channels)) + (FEATURES if self.transfer is not None else 0)
            self.dense = nn.Identity()
            self.output = nn.Linear(self.pooled_dim, out_dim)
        else:
            self.pooled_dim = 3 * in_channels
            self.dense = nn.Sequential(
                nn.Linear(3 * in_channels, dense_units), nn.ReLU(), nn.Dropout(dropout),
                nn.Linear(dense_units, dense_units), nn.ReLU(), nn.Dropout(dropout))
            self.output = nn.Linear(dense_units, out_dim)

    @classmethod
    def from_train_conf(cls, train_conf: Mapping[str, Any], n_mels: int, out_dim: int) -> "FactorCNN":
        """Build from a ``TrainConf`` (or its dict, as stored in ``meta['train']``).  The kind is
        ``train.model``; the train stage resolves ``"auto"`` by the training set's size before
        it builds, so "auto" here (a conf used directly, an artifact older than the key) is
        the cnn; a missing ``pooling`` / ``transfer`` (artifacts older than the key) is "l2" /
        "none", and the transfer applies to a ridge model only (auto's cnn ignores it)."""
        get = train_conf.get if isinstance(train_conf, Mapping) else lambda k: getattr(train_conf, k, None)
        kind = str(get("model") or "auto")
        kind = "cnn" if kind == "auto" else kind
        return cls(n_mels=n_mels, out_dim=out_dim, conv_channels=list(get("conv_channels")),
                   conv_kernel=int(get("conv_kernel")), pool_sizes=list(get("pool_sizes")),
                   dense_units=int(get("dense_units")), dropout=float(get("dropout")),
                   target=str(get("target")), kind=kind, pooling=str(get("pooling") or "l2"),
                   transfer=str(get("transfer") or "none") if kind == "ridge" else "none")

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised mels [B, n_mels, T] -> the pooled features the head reads [B, pooled_dim]."""
        if x.shape[-1] < self.min_frames:
            raise ValueError(f"input has {x.shape[-1]} frames; the model needs at least {self.min_frames}")
        if self.kind == "cnn":
            return self.pool(self.convs(x))
        parts, mels = [self.pool(x)], x
        for start in range(0, len(self.convs), 3):
            x = self.convs[start + 2](self.convs[start + 1](self.convs[start](x)))
            parts.append(self.pool(x))
        if self.transfer is not None:
            parts.append(self.transfer(mels))        # last: the Scorer appends it after the conv layers too
        return torch.cat(parts, dim=1)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer: the track embedding of a label-trained model."""
        return self.dense(self.pooled(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The track vector: predicted factors, or the penultimate layer for a label model."""
        h = self.hidden(x)
        return self.output(h) if self.target == "factors" else h

    @property
    def embed_dim(self) -> int:
        return self.out_dim if self.target == "factors" else self.output.in_features


# --- devices ------------------------------------------------------------------------------
def resolve_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cuda`` without a GPU is an error, not a fallback."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# --- the artifact -------------------------------------------------------------------------
def _models_path(lk, *parts: str) -> str:
    return lk.path(MODELS_DIR, *parts)


# A model id is one folder name under models/: letters, digits, '.', '_' and '-', not starting
# with '.', so an id from the config (infer.model, evaluate.model, --model) or from a LATEST
# file can never name a path outside the models folder ('../x', '/abs', 'a/b').
_MODEL_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def model_dir(lk, model_id: str) -> str:
    """``<root>/models/<model_id>`` (a filesystem path, or ``s3://...`` on S3); an id that is
    not one plain folder name is a configuration error (exit 2) naming it."""
    if not isinstance(model_id, str) or not _MODEL_ID.fullmatch(model_id):
        from deepcuts.core.config import ConfigError
        raise ConfigError(f"model id {model_id!r} is not a folder name under {_models_path(lk)} "
                          "(letters, digits, '.', '_', '-'; no '/' and no leading '.')")
    return _models_path(lk, model_id)


def latest_model_id(lk) -> str | None:
    data = read_bytes(_models_path(lk, LATEST))
    return data.decode().strip() or None if data is not None else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def state_dict_bytes(model: nn.Module) -> bytes:
    """``model.pt``'s bytes: ``torch.save`` of the state dict only (CPU tensors), what
    ``torch.load(..., weights_only=True)`` reads back."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def save_artifact(lk, model_id: str, model: FactorCNN, meta: Mapping[str, Any], publish: bool = True) -> str:
    """Write weights then meta (with the weights' checksum), then (``publish``) point LATEST at
    the model; the train stage publishes only after evaluating the saved artifact."""
    required = ("target", "n_mels", "out_dim", "train", "mel_mean", "mel_std", "crop_frames")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"artifact meta lacks {missing}")
    weights = state_dict_bytes(model)
    folder = model_dir(lk, model_id)
    write_bytes_atomic(posixpath.join(folder, WEIGHTS_FILE), weights)
    full_meta = {**_jsonable(dict(meta)), "model_id": model_id, "format": ARTIFACT_FORMAT,
                 "weights_sha256": hashlib.sha256(weights).hexdigest(), "weights_bytes": len(weights)}
    write_bytes_atomic(posixpath.join(folder, META_FILE), json.dumps(full_meta, indent=1).encode())
    if publish:
        write_bytes_atomic(_models_path(lk, LATEST), model_id.encode())
    return folder


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: where bfloat16 convolutions run 2-3x faster than float32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype scoring runs in.  ``auto``: float16 on CUDA, bfloat16 on a CPU with native
    bf16, else float32.  ``bf16`` where the hardware has it, else float32.  ``fp32`` always."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda":
        if precision == "auto":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


def window_starts(n_frames: int, window: int, stride: int = 1) -> list[int]:
    """Start frames of ceil(n/window) windows spread evenly over the excerpt, each a multiple
    of ``stride``.  Every frame is covered but at most the last stride-1, which a whole-
    excerpt pass does not see either (its pooling floors the same tail); nothing is padded."""
    if n_frames <= window:
        return [0]
    last = (n_frames - window) // stride * stride
    count = -(-n_frames // window)
    return sorted({int(round(s / stride)) * stride for s in np.linspace(0, last, count)})


class Scorer:
    """Inference-only view of a FactorCNN: the same weights, laid out for speed.

    The 1-D convolutions run as 2-D convolutions over channels-last [B, C, 1, T] tensors,
    oneDNN's fast path on CPU (1.3x float32, and bfloat16 takes AMX); the weights are cast
    once to the compute dtype instead of autocasting every call.  Global pooling runs in
    float32 (a long excerpt's L2 norm overflows float16), and so does a ridge model's linear
    head: its weights carry the feature standardisation, whose offsets cancel in bfloat16.
    Pretrained features (``train.transfer``) are computed once per track in float32 and, when
    scoring windows, shared by every window (they already average over 3 s patches).

    Windows share one pass of the conv stack: with valid convolutions and floor pooling, a
    window starting at a multiple of the total pooling stride sees exactly a slice of the
    whole excerpt's features at every layer, so the mean over windows costs one pass, not
    one per window (tests check it against scoring each window alone).
    """

    def __init__(self, model: FactorCNN, dtype: torch.dtype, device: torch.device):
        self.model, self.dtype, self.device = model, dtype, device
        self.convs: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        layers = list(model.convs)
        for conv, pool in zip(layers[0::3], layers[2::3]):
            weight = conv.weight.detach().to(device, dtype).unsqueeze(2)
            self.convs.append((weight.contiguous(memory_format=torch.channels_last),
                               conv.bias.detach().to(device, dtype), int(pool.kernel_size)))
        self.kernel = int(layers[0].kernel_size[0])
        self.stride = int(np.prod([pool for _, _, pool in self.convs]))
        self.ridge = model.kind == "ridge"
        self.spread = model.pool.spread
        self.transfer = model.transfer      # pretrained features: float32, on the model's device
        if self.ridge:
            self.head_dtype = torch.float32
            self.head = copy.deepcopy(model.output).to(device, torch.float32).eval()
        else:
            self.head_dtype = dtype
            self.head = copy.deepcopy(nn.Sequential(model.dense, model.output) if model.target == "factors"
                                      else model.dense).to(device, dtype).eval()

    def out_frames(self, frames: int, blocks: int | None = None) -> int:
        """Feature frames left from ``frames`` input frames after ``blocks`` conv blocks (all)."""
        for _, _, pool in self.convs[:blocks]:
            frames = (frames - self.kernel + 1) // pool
        return frames

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised mels [B, n_mels, T] -> every conv block's output [B, C, L] (compute dtype)."""
        x = x.to(self.dtype).unsqueeze(2).contiguous(memory_format=torch.channels_last)
        out = []
        for weight, bias, pool in self.convs:
            y = F.conv2d(x, weight, bias)                  # [B, C, 1, T], laid out as [B, T, C]
            batch, channels, _, frames = y.shape
            frames = frames // pool * pool
            y = y.permute(0, 2, 3, 1)[:, 0, :frames].reshape(batch, frames // pool, pool, channels)
            # ReLU after the max: they commute, and it then touches 1/pool of the values.
            x = F.relu(y.amax(dim=2)).permute(0, 2, 1).unsqueeze(2)
            out.append(x.squeeze(2))
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised mels [B, n_mels, T] -> the last conv block's features [B, C, L]."""
        return self.layer_features(x)[-1]

    def _pooled_layers(self, x: torch.Tensor) -> list[tuple[torch.Tensor, int, int]]:
        """(features, stride in input frames, blocks applied) of every pooled layer."""
        feats = self.layer_features(x)
        if not self.ridge:
            return [(feats[-1], self.stride, len(self.convs))]
        strides = np.cumprod([pool for _, _, pool in self.convs]).tolist()
        return [(x, 1, 0)] + [(f, int(s), i + 1) for i, (f, s) in enumerate(zip(feats, strides))]

    def vectors(self, x: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """Normalised mels -> float32 track vectors: one pass, or the mean over windows."""
        layers = self._pooled_layers(x)
        if window is None or x.shape[-1] <= window:
            parts = [pool_over_time(f, dim=2, spread=self.spread) for f, _, _ in layers]
            if self.transfer is not None:
                parts.append(self.transfer(x))
            return self.head(torch.cat(parts, dim=1).to(self.head_dtype)).float()
        starts = torch.tensor(window_starts(x.shape[-1], window, self.stride), device=x.device)
        parts = []
        for feats, stride, blocks in layers:
            index = starts[:, None] // stride + torch.arange(self.out_frames(window, blocks), device=x.device)
            assert int(index.max()) < feats.shape[-1], "window past the excerpt's features"
            parts.append(pool_over_time(feats[:, :, index], dim=3, spread=self.spread))  # [B, 3C, K]
        if self.transfer is not None:     # a track-level feature: the same for every window
            parts.append(self.transfer(x)[:, :, None].expand(-1, -1, len(starts)))
        pooled = torch.cat(parts, dim=1)
        batch, n_windows = pooled.shape[0], pooled.shape[2]
        out = self.head(pooled.transpose(1, 2).reshape(batch * n_windows, -1).to(self.head_dtype))
        return out.float().reshape(batch, n_windows, -1).mean(dim=1)


@dataclass
class Artifact:
    model: FactorCNN
    meta: dict
    model_id: str
    device: torch.device
    mel_mean: torch.Tensor
    mel_std: torch.Tensor
    dtype: torch.dtype = torch.float32     # scoring precision (see compute_dtype)

    @functools.cached_property
    def scorer(self) -> Scorer:
        """Built on first use: a load that only checks the artifact (the infer driver)
        never copies and casts the weights."""
        return Scorer(self.model, self.dtype, self.device)

    @property
    def out_dim(self) -> int:
        return self.model.embed_dim

    @property
    def time_stride(self) -> int:
        """Frames between conv feature frames: window starts are multiples of it."""
        return self.scorer.stride

    def embed(self, mels: np.ndarray, window: int | None = None) -> np.ndarray:
        """[B, n_mels, T] (float16 or float32) -> float32 [B, out_dim], normalised as in
        training, no grad.  ``window`` (frames): the mean over evenly spread windows of
        that length (``window_starts``); None: one pass over all T frames."""
        x = torch.as_tensor(np.ascontiguousarray(mels)).to(self.device).float()
        if x.ndim != 3 or x.shape[1] != self.model.n_mels:
            raise ValueError(f"expected mels [B, {self.model.n_mels}, T], got {tuple(x.shape)}")
        if x.shape[-1] < self.model.min_frames:
            raise ValueError(f"input has {x.shape[-1]} frames; the model needs at least {self.model.min_frames}")
        with torch.inference_mode():
            out = self.scorer.vectors(normalise(x, self.mel_mean, self.mel_std), window)
        return out.cpu().numpy()


def load_artifact(path_or_dir: str, device: str | torch.device = "cpu", precision: str = "fp32") -> Artifact:
    """Load ``<model dir>`` (or its ``model.pt``/``meta.json``); refuse anything inconsistent.

    ``precision`` (``compute_dtype``): ``auto`` scores in bfloat16 on a CPU with native bf16
    (vectors within ~1 % of float32) and float16 on CUDA; ``fp32`` in float32 everywhere."""
    folder = path_or_dir.rstrip("/")
    if folder.endswith(WEIGHTS_FILE) or folder.endswith(META_FILE):
        folder = posixpath.dirname(folder)
    meta_path, weights_path = posixpath.join(folder, META_FILE), posixpath.join(folder, WEIGHTS_FILE)
    meta_bytes = read_bytes(meta_path)
    if meta_bytes is None:
        raise ModelArtifactError(f"model artifact {meta_path} is missing")
    try:
        meta = json.loads(meta_bytes)
        n_mels, train_conf = int(meta["n_mels"]), meta["train"]
        # out_dim is the embedding's length; a label model's output layer has n_outputs units.
        n_outputs = int(meta.get("n_outputs", meta["out_dim"]))
        mean = torch.tensor(meta["mel_mean"], dtype=torch.float32)
        std = torch.tensor(meta["mel_std"], dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelArtifactError(f"model metadata {meta_path} is unreadable or incomplete: {exc!r}") from exc
    weights = read_bytes(weights_path)
    if weights is None:
        raise ModelArtifactError(f"model weights {weights_path} are missing")
    digest = hashlib.sha256(weights).hexdigest()
    if meta.get("weights_sha256") and digest != meta["weights_sha256"]:
        raise ModelArtifactError(f"model weights {weights_path} are corrupted or truncated: "
                                 f"{len(weights)} bytes with sha256 {digest[:12]}..., meta.json expects "
                                 f"{meta.get('weights_bytes')} bytes with sha256 {meta['weights_sha256'][:12]}...")
    dev = torch.device(device)
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        model = FactorCNN.from_train_conf(train_conf, n_mels=n_mels, out_dim=n_outputs)
        model.load_state_dict(state)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        raise ModelArtifactError(f"model weights {weights_path} cannot be loaded: {exc}") from exc
    if mean.shape != (n_mels,) or std.shape != (n_mels,):
        raise ModelArtifactError(f"model metadata {meta_path}: mel_mean/mel_std must hold {n_mels} values")
    model.to(dev).eval()
    return Artifact(model=model, meta=meta, model_id=str(meta.get("model_id", posixpath.basename(folder))),
                    device=dev, mel_mean=mean.to(dev), mel_std=std.to(dev),
                    dtype=compute_dtype(precision, dev))
