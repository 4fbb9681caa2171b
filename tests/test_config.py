import pytest

from deepcuts.core.config import ConfigError, load_config, parse_override_value


def test_defaults_load_and_are_typed():
    cfg = load_config()
    assert cfg.ingest.n_mels == 128 and cfg.ingest.n_fft == 1024 and cfg.ingest.hop_length == 512
    assert cfg.ingest.sample_rate == 22050
    assert isinstance(cfg.factors.alpha, float)


@pytest.mark.parametrize("key,value,fragment", [
    ("ingest.n_mels", "abc", "ingest.n_mels = 'abc': expected int"),
    ("ingest.n_mels", "8", ">= 16"),
    ("ingest.excerpt", "start", "one of 'middle', 'whole'"),
    ("factors.alpha", "0", "> 0.0"),
    ("factors.evaluate", "1", "expected bool"),
    ("demo.codecs", '["wav", "aac"]', "demo.codecs[1] = 'aac'"),
])
def test_bad_values_name_the_key_and_what_is_allowed(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides={key: value})
    assert fragment in str(err.value)


def test_unknown_key_and_section_are_refused():
    with pytest.raises(ConfigError, match="unknown key ingest.nmels; allowed keys"):
        load_config(overrides={"ingest.nmels": "64"})
    with pytest.raises(ConfigError, match="unknown section 'ingets'"):
        load_config(overrides={"ingets.n_mels": "64"})


def test_cross_section_rule_window_must_fit_in_every_mel():
    with pytest.raises(ConfigError, match="train.crop_seconds"):
        load_config(overrides={"train.crop_seconds": "5.0", "ingest.min_seconds": "3.0"})


def test_conf_file_layers_over_defaults_and_is_validated(tmp_path):
    layer = tmp_path / "prod.toml"
    layer.write_text('[warehouse]\nroot = "/data/wh"\n[factors]\nrank = 64\n')
    cfg = load_config(layer)
    assert cfg.warehouse.root == "/data/wh" and cfg.factors.rank == 64 and cfg.factors.iterations == 10
    layer.write_text("[factors]\nrnak = 64\n")
    with pytest.raises(ConfigError, match="unknown key factors.rnak"):
        load_config(layer)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


def test_override_values_parse_as_toml_else_string():
    assert parse_override_value("3") == 3
    assert parse_override_value("0.5") == 0.5
    assert parse_override_value("true") is True
    assert parse_override_value('["a", "b"]') == ["a", "b"]
    assert parse_override_value("./some/path") == "./some/path"


def test_replace_returns_a_validated_copy():
    cfg = load_config()
    assert cfg.replace(**{"factors.rank": 8}).factors.rank == 8
    with pytest.raises(ConfigError):
        cfg.replace(**{"factors.rank": 0})
