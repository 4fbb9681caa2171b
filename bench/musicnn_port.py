"""musicnn's MSD_vgg (Pons & Serra 2019; the ``musicnn`` 0.1.0 wheel, ISC licence) in torch, for
``bench/transfer.py``: its weights read from the wheel's TensorFlow 1.x checkpoint without
TensorFlow, and its input (16 kHz, 96 mel bands up to 8 kHz, hop 256, ``log10(10000 x + 1)``)
approximated from the mels deepcuts stores (22.05 kHz, 128 bands up to 11.025 kHz, hop 512,
dB), so no audio is decoded again.

A checkpoint is a tensor bundle: ``.index`` is a LevelDB table (uncompressed blocks of
prefix-compressed keys) mapping each variable name to a ``BundleEntryProto`` (dtype, shape,
offset and size in the ``.data`` shard), read here with a minimal varint/protobuf parser.
"""
from __future__ import annotations

import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

WHEEL = "musicnn==0.1.0"
CHECKPOINT = "musicnn/MSD_vgg/"          # inside the wheel
PATCH_FRAMES = 187                       # the model's 3 s input
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64}
_TABLE_MAGIC = 0xdb4775248b80fb57


# --- the checkpoint ------------------------------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _block_entries(block: bytes):
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end, pos, key = len(block) - 4 - 4 * restarts, 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        size, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + size]
        pos += size


def _block(table: bytes, handle: bytes, pos: int = 0) -> bytes:
    offset, pos = _varint(handle, pos)
    size, _ = _varint(handle, pos)
    if table[offset + size] != 0:
        raise ValueError("compressed checkpoint index block: not supported")
    return table[offset:offset + size]


def _fields(message: bytes):
    pos = 0
    while pos < len(message):
        tag, pos = _varint(message, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(message, pos)
        elif wire == 2:
            n, pos = _varint(message, pos)
            value, pos = message[pos:pos + n], pos + n
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = message[pos:pos + width], pos + width
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield number, value


def read_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """Every variable of a TF 1.x checkpoint ``prefix`` (``<prefix>.index`` + one data shard)."""
    index = Path(prefix + ".index").read_bytes()
    data = Path(prefix + ".data-00000-of-00001").read_bytes()
    footer = index[-48:]
    if struct.unpack_from("<Q", footer, 40)[0] != _TABLE_MAGIC:
        raise ValueError(f"{prefix}.index is not a tensor bundle index")
    _, pos = _varint(footer, 0)
    _, pos = _varint(footer, pos)                         # the metaindex handle: unused
    out = {}
    for _, handle in _block_entries(_block(index, footer, pos)):
        for key, value in _block_entries(_block(index, handle)):
            if not key:
                continue                                  # the bundle header
            entry = {"dtype": 1, "shape": [], "offset": 0, "size": 0}
            for number, v in _fields(value):
                if number == 1:
                    entry["dtype"] = v
                elif number == 2:
                    entry["shape"] = [dict(_fields(dim)).get(1, 0) for n, dim in _fields(v) if n == 2]
                elif number == 4:
                    entry["offset"] = v
                elif number == 5:
                    entry["size"] = v
            raw = data[entry["offset"]:entry["offset"] + entry["size"]]
            out[key.decode()] = np.frombuffer(raw, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return out


def fetch_checkpoint(cache: Path) -> str:
    """The MSD_vgg checkpoint prefix, from the musicnn wheel (``pip download``, once)."""
    folder = cache / "musicnn-0.1.0"
    if not (folder / CHECKPOINT / ".index").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), WHEEL],
                       check=True)
        with zipfile.ZipFile(next(cache.glob("musicnn-0.1.0-*.whl"))) as wheel:
            wheel.extractall(folder)
    return str(folder / CHECKPOINT) + "/"      # the files are "<prefix>.index": the prefix is the folder


# --- the network ---------------------------------------------------------------------------------
def build(prefix: str):
    """MSD_vgg as a torch module, weights from the checkpoint; ``forward(x [B, 187, 96])`` ->
    (tag logits [B, 50], the five pooled conv blocks)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    eps = 1e-3                      # tf.layers.batch_normalization's default
    pools = [((4, 1), (2, 2)), ((2, 2), (2, 2)), ((2, 2), (2, 2)), ((2, 2), (2, 2)), ((4, 4), (4, 4))]

    class MusicnnVGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_in = nn.BatchNorm2d(1, eps=eps)
            self.convs = nn.ModuleList([nn.Conv2d(1 if i == 0 else 128, 128, 3, padding=1) for i in range(5)])
            self.bns = nn.ModuleList([nn.BatchNorm2d(128, eps=eps) for _ in range(5)])
            self.dense = nn.Linear(256, 50)

        def forward(self, x):
            x = self.bn_in(x[:, None])                   # [B, 1, time, freq]: TF's NHWC as NCHW
            blocks = []
            for conv, bn, (kernel, stride) in zip(self.convs, self.bns, pools):
                x = F.max_pool2d(bn(F.relu(conv(x))), kernel, stride)    # TF: ReLU, then batch norm
                blocks.append(x)
            return self.dense(x.permute(0, 2, 3, 1).reshape(len(x), -1)), blocks   # TF flattens NHWC

    ck = read_checkpoint(prefix)
    net = MusicnnVGG()
    tensor = lambda name: torch.from_numpy(np.array(ck[name]))   # noqa: E731
    names = ["batch_normalization"] + [f"batch_normalization_{i}" for i in range(1, 6)]
    with torch.no_grad():
        for bn, name in zip([net.bn_in, *net.bns], names):
            bn.weight.copy_(tensor(f"{name}/gamma"))
            bn.bias.copy_(tensor(f"{name}/beta"))
            bn.running_mean.copy_(tensor(f"{name}/moving_mean"))
            bn.running_var.copy_(tensor(f"{name}/moving_variance"))
        for i, conv in enumerate(net.convs):
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(ck[f"{i + 1}CNN/kernel"].transpose(3, 2, 0, 1))))
            conv.bias.copy_(tensor(f"{i + 1}CNN/bias"))
        net.dense.weight.copy_(torch.from_numpy(np.ascontiguousarray(ck["dense/kernel"].T)))
        net.dense.bias.copy_(tensor("dense/bias"))
    return net.eval()


# --- its input from a stored mel -----------------------------------------------------------------
def _band_centres(n_mels: int, fmax: float) -> np.ndarray:
    import librosa
    return librosa.hz_to_mel(librosa.mel_frequencies(n_mels + 2, fmin=0.0, fmax=fmax))[1:-1]


# The power scale between the two filterbanks (n_fft, rate): fitted once by least squares in the
# logC domain against musicnn's own front end on real recordings (4 game tracks, 20 s each).
POWER_SCALE = 0.316


def adapt(db: np.ndarray, sample_rate: int = 22050, hop: int = 512, fmax: float | None = None,
          scale: float = POWER_SCALE) -> np.ndarray:
    """[n_mels, T] dB mel (deepcuts' ``mels``) -> [T', 96] musicnn logC mel: linear
    interpolation over band centres on the mel scale, then over time (62.5 frames/s)."""
    src = _band_centres(db.shape[0], fmax or sample_rate / 2)
    dst = _band_centres(96, 8000.0)
    bands = np.stack([np.interp(dst, src, db[:, t]) for t in range(db.shape[1])], axis=1)
    t_src = np.arange(db.shape[1]) * hop / sample_rate
    t_dst = np.arange(int(t_src[-1] * 62.5) + 1) / 62.5
    resampled = np.stack([np.interp(t_dst, t_src, row) for row in bands])
    return np.log10(10000 * scale * 10 ** (resampled / 10) + 1).T.astype(np.float32)


def patches(rep: np.ndarray, frames: int = PATCH_FRAMES) -> np.ndarray:
    """Non-overlapping 3 s patches [P, 187, 96] (a shorter excerpt is repeated, as musicnn pads)."""
    if len(rep) < frames:
        rep = np.concatenate([rep] * (frames // len(rep) + 1))
    return np.stack([rep[i:i + frames] for i in range(0, len(rep) - frames + 1, frames)])


def track_features(net, db: np.ndarray) -> np.ndarray:
    """One track's features: each conv block's mean and max over time, frequency and patches and
    the spread of its patch means, and the mean tag probabilities (50): 1,970 numbers."""
    import torch
    with torch.inference_mode():
        logits, blocks = net(torch.from_numpy(patches(adapt(db))))
    parts = []
    for block in blocks:                                     # [P, C, T, F]
        per_patch = block.mean(dim=(2, 3))
        parts += [per_patch.mean(0), block.amax(dim=(0, 2, 3)), per_patch.std(0, unbiased=False)]
    parts.append(torch.sigmoid(logits).mean(0))
    return torch.cat(parts).numpy()
