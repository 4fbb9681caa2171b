"""FactorCNN and its artifact: shapes, global pooling, save/load round trip, damaged files refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_config
from deepcuts.audio.decode import mel_from_bytes
from deepcuts.nn.model import (Artifact, FactorCNN, ModelArtifactError, frames_for_seconds,
                            latest_model_id, load_artifact, min_frames, model_dir, save_artifact)
from deepcuts.core.lake import Lake

SMALL = {"train__conv_channels": [16, 16, 16], "train__dense_units": 32}


def _meta(cfg, model: FactorCNN, mean=None, std=None) -> dict:
    import dataclasses
    return {"target": model.target, "n_mels": model.n_mels, "out_dim": model.out_dim,
            "train": dataclasses.asdict(cfg.train),
            "mel_mean": (mean if mean is not None else np.zeros(model.n_mels)).tolist(),
            "mel_std": (std if std is not None else np.ones(model.n_mels)).tolist(), "crop_frames": 130,
            "factors_run_id": "factors-1", "label_names": []}


def test_min_frames_and_whole_excerpt_share_the_model(tmp_path):
    cfg = make_config(tmp_path, **SMALL)
    model = FactorCNN.from_train_conf(cfg.train, n_mels=128, out_dim=32).eval()
    assert model.min_frames == min_frames(4, [4, 2, 2]) == 55
    assert frames_for_seconds(3.0, 22050, 512) == 130
    crop, excerpt = torch.randn(3, 128, 130), torch.randn(1, 128, 1292)
    assert model(crop).shape == (3, 32) and model(excerpt).shape == (1, 32)
    assert model(torch.randn(1, 128, model.min_frames)).shape == (1, 32)
    with pytest.raises(ValueError, match="at least 55"):
        model(torch.randn(1, 128, 54))
    # Global pooling concatenates mean, max and L2 norm over time.
    pooled = model.pool(torch.tensor([[[1.0, 3.0, 2.0]]]))
    assert torch.allclose(pooled, torch.tensor([[2.0, 3.0, float(np.sqrt(14.0))]]))


def test_rms_pooling_is_length_free_and_survives_the_artifact(tmp_path):
    """train.pooling = "rms": a crop and the same sound tiled 10x pool alike (the L2 norm
    grows sqrt(10)x); the artifact scores with the pooling it was trained with, and an
    artifact written before the key existed loads as "l2"."""
    import dataclasses
    cfg = make_config(tmp_path, **SMALL, train__pooling="rms")
    torch.manual_seed(0)
    model = FactorCNN.from_train_conf(cfg.train, n_mels=16, out_dim=4).eval()
    assert model.pool.spread == "rms"
    crop = torch.randn(1, 16, 7)
    np.testing.assert_allclose(model.pool(crop.repeat(1, 1, 10)), model.pool(crop), rtol=1e-5)
    l2 = FactorCNN.from_train_conf(make_config(tmp_path, **SMALL).train, n_mels=16, out_dim=4).pool
    assert torch.allclose(l2(crop.repeat(1, 1, 10))[:, 32:], l2(crop)[:, 32:] * np.sqrt(10.0))
    wh = Lake(str(tmp_path / "wh"))
    mels = np.random.default_rng(2).normal(0, 1, (2, 16, 300)).astype(np.float32)
    artifact = load_artifact(save_artifact(wh, "cnn-rms", model, _meta(cfg, model)))
    assert artifact.scorer.spread == "rms"
    with torch.inference_mode():
        np.testing.assert_allclose(artifact.embed(mels), model(torch.from_numpy(mels)).numpy(), rtol=1e-5, atol=1e-6)
    old_meta = _meta(cfg, model)
    del old_meta["train"]["pooling"]
    assert FactorCNN.from_train_conf(old_meta["train"], n_mels=16, out_dim=4).pool.spread == "l2"
    assert dataclasses.asdict(cfg.train)["pooling"] == "rms"


def test_labels_model_embeds_the_penultimate_layer(tmp_path):
    cfg = make_config(tmp_path, **SMALL, train__target="labels")
    model = FactorCNN.from_train_conf(cfg.train, n_mels=64, out_dim=5).eval()
    x = torch.randn(2, 64, 100)
    assert model(x).shape == (2, 5) and model.embed(x).shape == (2, 32) and model.embed_dim == 32


def test_decode_mel_round_trip_and_bad_length():
    mel = (np.arange(12, dtype=np.float32).reshape(3, 4) - 60).astype(np.float16)
    out = mel_from_bytes(mel.tobytes(), 3, 4)
    assert out.dtype == np.float32 and out.shape == (3, 4) and np.array_equal(out, mel.astype(np.float32))
    with pytest.raises(ValueError, match="expected 24"):
        mel_from_bytes(mel.tobytes()[:-2], 3, 4)


def test_artifact_round_trip_normalises_and_publishes_latest(tmp_path):
    cfg = make_config(tmp_path, **SMALL)
    wh = Lake(str(tmp_path / "wh"))
    assert latest_model_id(wh) is None
    torch.manual_seed(0)
    model = FactorCNN.from_train_conf(cfg.train, n_mels=16, out_dim=4).eval()
    mean, std = np.linspace(-60, -20, 16).astype(np.float32), np.full(16, 5.0, np.float32)
    folder = save_artifact(wh, "cnn-a", model, _meta(cfg, model, mean, std), publish=False)
    assert latest_model_id(wh) is None     # not published until the caller says so
    save_artifact(wh, "cnn-a", model, _meta(cfg, model, mean, std))
    assert latest_model_id(wh) == "cnn-a" and folder == model_dir(wh, "cnn-a")
    artifact = load_artifact(folder)
    assert isinstance(artifact, Artifact) and artifact.model_id == "cnn-a" and not artifact.model.training
    mels = np.random.default_rng(1).normal(-40, 10, (2, 16, 80)).astype(np.float32)
    expected = model((torch.from_numpy(mels) - torch.from_numpy(mean)[None, :, None])
                     / torch.from_numpy(std)[None, :, None]).detach().numpy()
    np.testing.assert_allclose(artifact.embed(mels), expected, rtol=1e-5, atol=1e-6)
    assert load_artifact(folder + "/model.pt").meta["factors_run_id"] == "factors-1"


def test_damaged_artifacts_are_refused_by_name(tmp_path):
    cfg = make_config(tmp_path, **SMALL)
    wh = Lake(str(tmp_path / "wh"))
    model = FactorCNN.from_train_conf(cfg.train, n_mels=16, out_dim=4)
    folder = save_artifact(wh, "cnn-b", model, _meta(cfg, model))
    weights = tmp_path / "wh" / "models" / "cnn-b" / "model.pt"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelArtifactError, match="model.pt are corrupted or truncated"):
        load_artifact(folder)
    flipped = bytearray(good)
    flipped[-100] ^= 0x55
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ModelArtifactError, match="model.pt"):
        load_artifact(folder)
    weights.unlink()
    with pytest.raises(ModelArtifactError, match="model.pt are missing"):
        load_artifact(folder)
    (tmp_path / "wh" / "models" / "cnn-b" / "meta.json").write_text("{not json")
    with pytest.raises(ModelArtifactError, match="meta.json"):
        load_artifact(folder)
    with pytest.raises(ModelArtifactError, match="missing"):
        load_artifact(str(tmp_path / "nowhere"))
    # Weights from another architecture (the checksum matches, the shapes do not) are refused too.
    other = FactorCNN.from_train_conf(cfg.replace(**{"train.dense_units": 8}).train, n_mels=16, out_dim=4)
    save_artifact(wh, "cnn-c", other, _meta(cfg, model))
    with pytest.raises(ModelArtifactError, match="cannot be loaded"):
        load_artifact(model_dir(wh, "cnn-c"))
    meta = json.loads((tmp_path / "wh" / "models" / "cnn-c" / "meta.json").read_text())
    assert meta["weights_sha256"] and meta["model_id"] == "cnn-c"


def test_reduced_precision_scores_within_two_percent_of_fp32(tmp_path):
    """infer.precision: "auto"/"bf16" score in bfloat16 on CPUs with native bf16, and only there."""
    from deepcuts.nn.model import compute_dtype, cpu_has_native_bf16
    cpu = torch.device("cpu")
    native = cpu_has_native_bf16()
    assert compute_dtype("fp32", cpu) == torch.float32
    for precision in ("auto", "bf16"):
        assert compute_dtype(precision, cpu) == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ValueError, match="precision"):
        compute_dtype("fp8", cpu)
    cfg = make_config(tmp_path, **SMALL)
    wh = Lake(str(tmp_path / "wh"))
    torch.manual_seed(0)
    model = FactorCNN.from_train_conf(cfg.train, n_mels=16, out_dim=4).eval()
    mean, std = np.zeros(16, np.float32), np.ones(16, np.float32)
    folder = save_artifact(wh, "cnn-b", model, _meta(cfg, model, mean, std))
    full, reduced = load_artifact(folder), load_artifact(folder, precision="auto")
    assert full.dtype == torch.float32 and reduced.dtype == compute_dtype("auto", cpu)
    mels = np.random.default_rng(2).normal(0, 1, (3, 16, 120)).astype(np.float32)
    a, b = full.embed(mels), reduced.embed(mels)
    assert b.dtype == np.float32
    assert float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1))) < 0.02
    # The float16 weights of a CUDA "auto" run, exercised here on the CPU.
    half = Artifact(model, full.meta, "cnn-b", cpu, full.mel_mean, full.mel_std, dtype=torch.float16)
    assert float(np.max(np.linalg.norm(a - half.embed(mels), axis=1) / np.linalg.norm(a, axis=1))) < 0.02


def test_window_starts_are_aligned_spread_and_cover_the_excerpt():
    from deepcuts.nn.model import window_starts
    assert window_starts(100, 130, 16) == [0] and window_starts(130, 130, 16) == [0]
    starts = window_starts(1292, 130, 16)
    assert len(starts) == 10 and starts[0] == 0 and all(s % 16 == 0 for s in starts)
    assert starts == sorted(set(starts)) and 1292 - 16 < starts[-1] + 130 <= 1292
    covered = np.zeros(1292, bool)
    for s in starts:
        covered[s:s + 130] = True
    assert covered[:1292 - 15].all()          # at most stride-1 tail frames, as a whole pass
    assert window_starts(1292, 130) == [int(round(s)) for s in np.linspace(0, 1162, 10)]


@pytest.mark.parametrize("target,pooling", [("factors", "l2"), ("labels", "l2"), ("factors", "rms")])
def test_windows_share_one_conv_pass_and_equal_scoring_each_window(tmp_path, target, pooling):
    """Artifact.embed(mels, window) == the mean of embedding each window alone (fp32)."""
    from deepcuts.nn.model import window_starts
    cfg = make_config(tmp_path, train__conv_channels=[8, 8, 8], train__pool_sizes=[4, 2, 2],
                      train__dense_units=16, train__target=target, train__pooling=pooling)
    torch.manual_seed(3)
    model = FactorCNN.from_train_conf(cfg.train, n_mels=16, out_dim=5).eval()
    wh = Lake(str(tmp_path / "wh"))
    mean, std = np.full(16, -30, np.float32), np.full(16, 8, np.float32)
    artifact = load_artifact(save_artifact(wh, "cnn-w", model, _meta(cfg, model, mean, std)))
    assert artifact.time_stride == 16
    mels = np.random.default_rng(4).normal(-30, 8, (3, 16, 701)).astype(np.float16)
    window = 130
    starts = window_starts(701, window, artifact.time_stride)
    alone = np.mean([artifact.embed(mels[:, :, s:s + window]) for s in starts], axis=0)
    shared = artifact.embed(mels, window)
    assert shared.shape == (3, model.embed_dim)
    np.testing.assert_allclose(shared, alone, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        direct = model.embed((torch.from_numpy(mels.astype(np.float32)) + 30) / 8).numpy()
    np.testing.assert_allclose(artifact.embed(mels), direct, rtol=1e-5, atol=1e-6)
    assert not np.allclose(shared, artifact.embed(mels), atol=1e-4)


def test_a_model_id_that_leaves_the_models_folder_is_refused(tmp_path):
    # infer.model / evaluate.model / --model and models/LATEST name a folder under models/,
    # never a path: '../', absolute, nested or hidden ids are a configuration error (exit 2).
    from deepcuts.core.config import ConfigError
    from deepcuts.nn.model import model_dir
    lk = Lake(str(tmp_path / "warehouse"))
    assert model_dir(lk, "cnn-20261202T144807-6aa7fd11") == str(tmp_path / "warehouse" / "models" /
                                                                "cnn-20261202T144807-6aa7fd11")
    for bad in ("../escape", "/etc", "a/b", "..", ".hidden", "", "x\n", "a\\b"):
        with pytest.raises(ConfigError, match="not a folder name under"):
            model_dir(lk, bad)
