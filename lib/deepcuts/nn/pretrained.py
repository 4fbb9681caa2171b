"""Features of a pretrained music network for the ridge model (issue 13, step 3a:
``train.transfer = "musicnn"``).

The network is musicnn's MSD_vgg (Pons & Serra 2019: five 3 x 3 conv blocks trained to tag the
Million Song Dataset; the ``musicnn`` 0.1.0 wheel, ISC licence).  Its weights ship inside that
wheel as a TensorFlow 1.x checkpoint; ``bin/bootstrap.sh`` converts them once, at install time,
into a torch state dict of :class:`MusicnnVGG` (``python -m deepcuts.nn.pretrained install
FILE``: ``pip download`` of the wheel, :mod:`deepcuts.nn.tfcheckpoint`, ``torch.save``).
Nothing is fetched at run time: the train stage reads that file (``train.transfer_weights``)
and the fitted model carries the weights in its own artifact, so infer needs no extra file.

Its input is 16 kHz audio as 96 mel bands up to 8 kHz, hop 256, ``log10(10000 x + 1)``, in
3 s patches of 187 frames.  :class:`TransferFeatures` approximates it from the mels deepcuts
stores (``ingest.sample_rate`` / ``n_mels`` / ``hop_length``, dB): linear interpolation over
band centres on the mel scale, then over time, then the power scale between the two
filterbanks (``POWER_SCALE``, fitted by least squares against musicnn's own front end on real
recordings), so no audio is decoded again.  Per track: each conv block's mean and max over
time, frequency and patches and the spread of its patch means, and the mean tag
probabilities: ``FEATURES`` = 1,970 numbers, which the ridge model appends to its random-conv
features.

Cost: measured 0.51-0.58 core-s per 30 s excerpt here in float32 (10 patches; the random conv
stack of the ridge model takes 9 ms): at 10^6 tracks ~150 core-hours more in infer (every
track; a nightly run scores only new and changed ones) and in train (its training tracks),
~1,500 at 10^7.  bfloat16 would be 1.6x faster but moves features by ~0.7 % of their range,
which the ridge head's standardisation amplifies, so it runs in float32.  Memory per task:
``PATCHES_PER_PASS`` patches' activations at a time, whatever the batch of tracks.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from deepcuts.core.errors import InputMissing

NETWORKS = ("none", "musicnn")
WHEEL = "musicnn==0.1.0"
CHECKPOINT = "musicnn/MSD_vgg/"          # inside the wheel; its files are "<folder>/.index", ...
PATCH_FRAMES = 187                       # the network's 3 s input
PATCHES_PER_PASS = 16                    # patches through the network at once: ~0.3 GB of activations
BANDS, BANDS_FMAX, FRAME_RATE = 96, 8000.0, 16000 / 256
POWER_SCALE = 0.316
CHANNELS, BLOCKS, TAGS = 128, 5, 50
FEATURES = BLOCKS * 3 * CHANNELS + TAGS  # 1,970
_BN_EPS = 1e-3                           # tf.layers.batch_normalization's default
# (kernel, stride) of the max-pool after each block, as musicnn's vgg front end has them
_POOLS = (((4, 1), (2, 2)), ((2, 2), (2, 2)), ((2, 2), (2, 2)), ((2, 2), (2, 2)), ((4, 4), (4, 4)))


class PretrainedWeightsMissing(InputMissing):
    """The converted weights file is absent or unreadable (exit 3): bin/bootstrap.sh makes it."""


class MusicnnVGG(nn.Module):
    """MSD_vgg in torch: ``forward(x [B, 187, 96])`` -> (tag logits [B, 50], the five blocks)."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(1, eps=_BN_EPS)
        self.convs = nn.ModuleList([nn.Conv2d(1 if i == 0 else CHANNELS, CHANNELS, 3, padding=1)
                                    for i in range(BLOCKS)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(CHANNELS, eps=_BN_EPS) for _ in range(BLOCKS)])
        self.dense = nn.Linear(256, TAGS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.bn_in(x[:, None])                        # [B, 1, time, freq]: TF's NHWC as NCHW
        blocks = []
        for conv, bn, (kernel, stride) in zip(self.convs, self.bns, _POOLS):
            x = F.max_pool2d(bn(F.relu(conv(x))), kernel, stride)   # TF order: ReLU, then batch norm
            blocks.append(x)
        return self.dense(x.permute(0, 2, 3, 1).reshape(len(x), -1)), blocks   # TF flattens NHWC


def convert_checkpoint(prefix: str) -> dict[str, torch.Tensor]:
    """MSD_vgg's TF checkpoint -> a :class:`MusicnnVGG` state dict (every tensor checked)."""
    from deepcuts.nn.tfcheckpoint import read_checkpoint
    ck = read_checkpoint(prefix)
    tensor = lambda name: torch.from_numpy(np.array(ck[name], dtype=np.float32))   # noqa: E731 (a writable copy)
    state = {}
    names = ["batch_normalization"] + [f"batch_normalization_{i}" for i in range(1, BLOCKS + 1)]
    for module, name in zip(["bn_in"] + [f"bns.{i}" for i in range(BLOCKS)], names):
        for ours, theirs in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                             ("running_var", "moving_variance")):
            state[f"{module}.{ours}"] = tensor(f"{name}/{theirs}")
        state[f"{module}.num_batches_tracked"] = torch.tensor(0)
    for i in range(BLOCKS):
        state[f"convs.{i}.weight"] = tensor(f"{i + 1}CNN/kernel").permute(3, 2, 0, 1).contiguous()   # HWIO -> OIHW
        state[f"convs.{i}.bias"] = tensor(f"{i + 1}CNN/bias")
    state["dense.weight"] = tensor("dense/kernel").T.contiguous()
    state["dense.bias"] = tensor("dense/bias")
    MusicnnVGG().load_state_dict(state)                   # strict: every name and shape matches
    return state


def install(dest: Path) -> Path:
    """``pip download`` the musicnn wheel (no dependencies, nothing installed), convert its
    MSD_vgg checkpoint, write ``dest`` atomically; the wheel is not kept."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("musicnn-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(CHECKPOINT)]
            zf.extractall(tmp, members)
        state = convert_checkpoint(str(Path(tmp) / CHECKPOINT) + "/")
        partial = dest.with_name(dest.name + ".partial")
        torch.save(state, partial)
        partial.replace(dest)
    return dest


def weights_file(setting: str) -> Path:
    """``train.transfer_weights``: an absolute path, or one relative to the Python environment
    (``sys.prefix``: the venv bootstrap made)."""
    path = Path(setting).expanduser()
    return path if path.is_absolute() else Path(sys.prefix) / path


def load_weights(setting: str) -> dict[str, torch.Tensor]:
    path = weights_file(setting)
    if not path.is_file():
        raise PretrainedWeightsMissing(
            f"train.transfer = 'musicnn' needs the converted weights {path}; bin/bootstrap.sh makes them "
            f"('{sys.executable} -m deepcuts.nn.pretrained install {path}' does it alone)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # a truncated or foreign file: torch raises several kinds
        raise PretrainedWeightsMissing(f"the pretrained weights {path} cannot be loaded ({exc}); re-run "
                                       f"'{sys.executable} -m deepcuts.nn.pretrained install {path}'") from exc


# --- the input, from a stored mel -----------------------------------------------------------
def _band_centres(n_mels: int, fmax: float) -> np.ndarray:
    import librosa
    return librosa.hz_to_mel(librosa.mel_frequencies(n_mels + 2, fmin=0.0, fmax=fmax))[1:-1]


def band_matrix(n_mels: int, sample_rate: int) -> np.ndarray:
    """[96, n_mels]: linear interpolation over band centres on the mel scale, as a matrix (the
    stored mel spans 0 .. sample_rate / 2, librosa's default)."""
    src, dst = _band_centres(n_mels, sample_rate / 2), _band_centres(BANDS, BANDS_FMAX)
    return np.stack([np.interp(dst, src, column) for column in np.eye(n_mels)], axis=1).astype(np.float32)


def resample_time(x: torch.Tensor, frames_per_second: float) -> torch.Tensor:
    """[..., T] at ``frames_per_second`` -> [..., T'] at musicnn's 62.5 frames/s (linear)."""
    frames = x.shape[-1]
    if frames < 2:
        return x
    n_out = int((frames - 1) / frames_per_second * FRAME_RATE) + 1
    pos = torch.arange(n_out, device=x.device, dtype=torch.float64) * (frames_per_second / FRAME_RATE)
    lo = pos.floor().long().clamp(max=frames - 2)
    frac = (pos - lo).to(x.dtype)
    return x[..., lo] * (1 - frac) + x[..., lo + 1] * frac


def patches(rep: torch.Tensor) -> torch.Tensor:
    """[B, T', 96] -> [B, P, 187, 96] non-overlapping 3 s patches (a shorter input is repeated,
    as musicnn pads)."""
    if rep.shape[1] < PATCH_FRAMES:
        rep = rep.repeat(1, PATCH_FRAMES // rep.shape[1] + 1, 1)
    count = rep.shape[1] // PATCH_FRAMES
    return rep[:, :count * PATCH_FRAMES].reshape(len(rep), count, PATCH_FRAMES, BANDS)


class TransferFeatures(nn.Module):
    """Normalised deepcuts mels [B, n_mels, T] -> MSD_vgg track features [B, 1,970] (float32).

    Everything it needs is in its state dict (the network, the band map, the mel statistics
    that undo the normalisation, the stored mels' frame rate), so a model that holds it loads
    from its own artifact alone; :meth:`configure` fills them in at fit time."""

    def __init__(self, n_mels: int):
        super().__init__()
        self.net = MusicnnVGG().eval()
        self.register_buffer("bands", torch.zeros(BANDS, n_mels))
        self.register_buffer("mel_mean", torch.zeros(n_mels))
        self.register_buffer("mel_std", torch.ones(n_mels))
        self.register_buffer("frames_per_second", torch.tensor(22050 / 512, dtype=torch.float64))

    def configure(self, weights: dict, sample_rate: int, hop_length: int, mel_mean, mel_std) -> "TransferFeatures":
        self.net.load_state_dict(weights)
        n_mels = self.bands.shape[1]
        with torch.no_grad():
            self.bands.copy_(torch.from_numpy(band_matrix(n_mels, sample_rate)))
            self.mel_mean.copy_(torch.as_tensor(np.asarray(mel_mean, np.float32)))
            self.mel_std.copy_(torch.as_tensor(np.asarray(mel_std, np.float32)))
            self.frames_per_second.fill_(sample_rate / hop_length)
        return self

    def log_compressed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised mels [B, n_mels, T] -> musicnn's input representation [B, T', 96]."""
        db = x.float() * self.mel_std[None, :, None] + self.mel_mean[None, :, None]
        bands = resample_time(torch.einsum("fm,bmt->bft", self.bands, db), float(self.frames_per_second))
        power = torch.pow(10.0, bands / 10.0) * (10000.0 * POWER_SCALE)
        return torch.log10(power + 1.0).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cut = patches(self.log_compressed(x))                       # [B, P, 187, 96]
        batch, count = cut.shape[:2]
        flat = cut.reshape(batch * count, PATCH_FRAMES, BANDS)
        means, peaks, tags = [], [], []
        for start in range(0, len(flat), PATCHES_PER_PASS):        # bounded activations, whatever B x P
            logits, blocks = self.net(flat[start:start + PATCHES_PER_PASS])
            means.append(torch.stack([b.mean(dim=(2, 3)) for b in blocks], dim=1))     # [n, 5, C]
            peaks.append(torch.stack([b.amax(dim=(2, 3)) for b in blocks], dim=1))
            tags.append(torch.sigmoid(logits))
        means = torch.cat(means).reshape(batch, count, BLOCKS, -1)
        peaks = torch.cat(peaks).reshape(batch, count, BLOCKS, -1)
        parts = []
        for block in range(BLOCKS):
            per_patch = means[:, :, block]
            parts += [per_patch.mean(1), peaks[:, :, block].amax(1), per_patch.std(1, unbiased=False)]
        parts.append(torch.cat(tags).reshape(batch, count, -1).mean(1))
        return torch.cat(parts, dim=1)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepcuts.nn.pretrained",
                                     description="convert musicnn's MSD_vgg weights into a torch state dict")
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help=f"pip download {WHEEL} and convert its MSD_vgg checkpoint")
    inst.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    path = install(args.dest)
    print(f"pretrained: {path} ({path.stat().st_size / 1e6:.1f} MB, MSD_vgg from {WHEEL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
