"""train.model = "ridge" (issue 13): the closed-form fit from moments, the model it serves,
and the ridge path through the real chain (Spark, Petastorm band statistics, infer, evaluate)."""
import numpy as np
import pytest
import torch

from deepcuts.cf.baseline import cross_moments
from deepcuts.nn import ridge
from deepcuts.nn.model import FactorCNN, Scorer, normalise, window_starts


def _problem(n=120, d=15, r=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 30, size=d) + rng.normal(size=d) * 50
    x[:, 3] = 7.0                                  # a constant feature
    w = rng.normal(size=(d, r))
    y = x @ w * 0.01 + rng.normal(size=(n, r))
    return x, y


def test_mse_from_moments_matches_direct():
    x, y = _problem()
    w, b = np.random.default_rng(1).normal(size=(x.shape[1], y.shape[1])), np.arange(y.shape[1], dtype=float)
    direct = float(np.mean((y - x @ w - b) ** 2))
    assert ridge.mse_from_moments(cross_moments(x, y), w, b) == pytest.approx(direct, rel=1e-9)


def test_fit_equals_explicit_ridge_on_standardised_features():
    x, y = _problem()
    train, val = slice(0, 90), slice(90, None)
    got = ridge.fit(cross_moments(x[train], y[train]), cross_moments(x[val], y[val]), [0.01, 0.1, 1.0])
    # the reference: standardise on the training rows, drop the constant feature, solve directly
    xt = x[train]
    keep = xt.std(axis=0) > 1e-6
    mean, std = xt.mean(axis=0)[keep], xt.std(axis=0)[keep]
    z = (xt[:, keep] - mean) / std
    lam = got.penalty * keep.sum() * len(z)
    w_z = np.linalg.solve(z.T @ z + lam * np.eye(keep.sum()), z.T @ (y[train] - y[train].mean(axis=0)))
    pred = ((x[val][:, keep] - mean) / std) @ w_z + y[train].mean(axis=0)
    ours = x[val] @ got.weights + got.intercept
    np.testing.assert_allclose(ours, pred, rtol=1e-6, atol=1e-8)
    assert got.used_features == keep.sum() and got.chosen_by == "validation"
    assert got.validation_loss == pytest.approx(float(np.mean((y[val] - pred) ** 2)), rel=1e-6)
    assert got.validation_loss == min(v["validation"] for v in got.losses.values())
    assert got.weights[3].tolist() == [0.0] * y.shape[1]        # the constant feature weighs nothing


def test_fit_without_validation_uses_gcv_and_rejects_bad_penalties():
    x, y = _problem()
    got = ridge.fit(cross_moments(x, y), None, [1e-4, 1e-2, 1.0])
    assert got.chosen_by == "gcv" and got.validation_loss is None
    assert got.penalty == min(got.losses, key=lambda p: got.losses[p]["gcv"])
    with pytest.raises(ValueError, match="positive"):
        ridge.fit(cross_moments(x, y), None, [0.0, 1.0])


def _ridge_model(seed=3, out_dim=5):
    torch.manual_seed(seed)
    model = FactorCNN(n_mels=16, out_dim=out_dim, conv_channels=[8, 8, 8], conv_kernel=4, pool_sizes=[4, 2, 2],
                      dense_units=1, dropout=0.0, kind="ridge").eval()
    with torch.no_grad():
        model.output.weight.normal_()
    return model


def test_ridge_model_pools_every_layer_and_refuses_labels():
    model = _ridge_model()
    assert model.pooled_dim == 3 * (16 + 24)
    x = torch.randn(2, 16, 200)
    assert model.pooled(x).shape == (2, model.pooled_dim)
    # rms pooling: a track repeated twice over has the same features (the L2 norm would grow)
    with torch.no_grad():   # the input's mean, max and rms (its first 48 features)
        np.testing.assert_allclose(model.pooled(x[:, :, :64].repeat(1, 1, 2))[:, :48].numpy(),
                                   model.pooled(x[:, :, :64])[:, :48].numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="labels target needs the cnn"):
        FactorCNN(16, 5, [8], 4, [4], 1, 0.0, target="labels", kind="ridge")


def test_scorer_serves_the_ridge_model_whole_and_in_windows():
    model = _ridge_model()
    scorer = Scorer(model, torch.float32, torch.device("cpu"))
    x = torch.randn(3, 16, 301)
    with torch.no_grad():
        np.testing.assert_allclose(scorer.vectors(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-4)
        window = 64
        each = torch.stack([model(x[:, :, s:s + window]) for s in window_starts(301, window, scorer.stride)])
        np.testing.assert_allclose(scorer.vectors(x, window).numpy(), each.mean(dim=0).numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_pooled_features_and_set_head_reproduce_the_fit():
    model = _ridge_model(out_dim=3)
    rng = np.random.default_rng(0)
    mels = [rng.normal(size=(16, n)).astype(np.float32) for n in (120, 90, 200, 150, 64, 99)]
    mean, std = np.full(16, 0.1, np.float32), np.full(16, 2.0, np.float32)
    feats = ridge.pooled_features(model, mels, mean, std)
    targets = rng.normal(size=(len(mels), 3))
    fitted = ridge.fit(cross_moments(feats, targets), None, [0.1])
    ridge.set_head(model, fitted)
    with torch.no_grad():
        served = np.stack([model(normalise(torch.from_numpy(m)[None], torch.from_numpy(mean),
                                           torch.from_numpy(std)))[0].numpy() for m in mels])
    np.testing.assert_allclose(served, feats @ fitted.weights + fitted.intercept, rtol=1e-3, atol=1e-4)


def test_auto_fits_both_below_the_size_and_keeps_the_lower_validation_loss():
    from dataclasses import replace
    from deepcuts.core.config import load_config
    from deepcuts.stages.train import candidate_kinds, choose_kind
    t = replace(load_config().train, model="auto", auto_ridge_below_tracks=1000)
    assert candidate_kinds(t, 999)[0] == ["ridge", "cnn"]
    assert candidate_kinds(t, 1000)[0] == ["cnn"]
    assert candidate_kinds(replace(t, loss="wpe"), 10) == (["cnn"], "auto: train.loss = 'wpe' needs the cnn "
                                                                    "(the ridge model fits the mse targets)")
    assert candidate_kinds(replace(t, target="labels"), 10)[0] == ["cnn"]
    assert candidate_kinds(replace(t, model="ridge"), 10**6)[0] == ["ridge"]
    assert choose_kind({"ridge": 0.02, "cnn": 0.019}) == "cnn"
    assert choose_kind({"ridge": 0.02, "cnn": 0.02}) == "ridge"       # a tie: the cheaper
    assert choose_kind({"ridge": None, "cnn": None}) == "cnn"         # no validation tracks


@pytest.mark.spark
def test_ridge_with_a_target_it_cannot_fit_is_a_config_error(spark, small_config):
    from conftest import run_stage
    from deepcuts.core.config import ConfigError
    with pytest.raises(ConfigError, match="train.model = 'ridge': train.loss = 'wpe' needs the cnn"):
        run_stage(spark, small_config.replace(**{"train.model": "ridge", "train.loss": "wpe"}), "train")


@pytest.mark.spark
@pytest.mark.slow
def test_ridge_is_fitted_gated_on_whole_excerpts_served_and_auto_keeps_the_better(spark, demo_chain, tmp_path):
    """The chain's CNN is served; a ridge model (58 training tracks) is fitted, gated against
    it on whole excerpts, scored by infer and evaluate.  Then ``auto`` fits both again and
    keeps the one with the lower validation loss, gated against the served ridge model."""
    from conftest import copy_chain, run_stage
    from deepcuts.core import tables as T
    from deepcuts.core.lake import lake, read_pandas
    from deepcuts.nn.model import latest_model_id, load_artifact, model_dir
    from deepcuts.stages.train import choose_kind
    chain = copy_chain(demo_chain, tmp_path)
    # a generous tolerance, so the ridge model is served whatever the two losses are (both are checked)
    cfg = chain.cfg.replace(**{"train.model": "ridge", "train.promotion_tolerance": 10.0})
    summary = run_stage(spark, cfg, "train")
    assert summary["model"] == "ridge (train.model = 'ridge')" and summary["model_id"].startswith("ridge-")
    ridge_info = summary["ridge"]
    from deepcuts.nn.pretrained import FEATURES
    pretrained = FEATURES if cfg.train.transfer == "musicnn" else 0      # on by default (tests/test_pretrained.py)
    assert ridge_info["transfer"] == cfg.train.transfer
    assert ridge_info["chosen_by"] == "validation" and ridge_info["features"] == 3 * (cfg.ingest.n_mels + 3 * 24) + pretrained
    assert ridge_info["penalty"] in cfg.train.ridge_penalties
    gate = summary["promotion"]
    assert gate["current_model"] == demo_chain.summaries["train"]["model_id"]
    assert gate["current_validation_loss"] is not None and gate["new_validation_loss"] > 0
    lk = lake(cfg)
    artifact = load_artifact(model_dir(lk, summary["model_id"]))
    assert artifact.model.kind == "ridge" and artifact.meta["train"]["model"] == "ridge"
    assert gate["decision"] == "promoted" and latest_model_id(lk) == summary["model_id"]
    run_stage(spark, cfg, "infer")
    evaluation = run_stage(spark, cfg, "evaluate")
    results = read_pandas(lk, T.EVALUATION_RESULTS.name)
    run = results[results["run_id"] == evaluation["run_id"]].set_index(["split", "predictor"])
    assert run.loc[("cold", "cnn"), "model_id"] == summary["model_id"]
    assert run.loc[("cold", "cnn"), "auc"] > run.loc[("cold", "random"), "auc"] + 0.1

    again = run_stage(spark, cfg.replace(**{"train.model": "auto", "train.promotion_tolerance": 0.0}), "train")
    losses = again["auto_validation_losses"]
    assert list(losses) == ["ridge", "cnn"] and again["model"].startswith(choose_kind(losses) + " (auto: ")
    # the same training set: the ridge fit and its yardstick are deterministic
    assert losses["ridge"] == pytest.approx(gate["new_validation_loss"], rel=1e-4)
    assert again["promotion"]["current_model"] == summary["model_id"]
    assert again["promotion"]["current_validation_loss"] == pytest.approx(losses["ridge"], rel=1e-4)
    assert again["promotion"]["new_validation_loss"] == pytest.approx(losses[choose_kind(losses)], rel=1e-4)
