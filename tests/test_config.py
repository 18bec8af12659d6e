import pytest
from omegaconf import OmegaConf

from leanvl.config import Config, ConfigError, load_config, save_config, to_object


def test_defaults_preset_and_overrides_merge_in_order(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("seed: 3\ndata:\n  num_frames: 8\n  size: 64\n")
    cfg = load_config(preset, ["data.size=32", "synth.pretrain_clips=7"])
    assert (cfg.seed, cfg.data.num_frames, cfg.data.size, cfg.synth.pretrain_clips) == (3, 8, 32, 7)
    assert isinstance(to_object(cfg), Config)


@pytest.mark.parametrize("override,message", [
    ("data.num_frame=3", "unknown config key 'data.num_frame'; did you mean 'data.num_frames'?"),
    ("sed=1", "unknown config key 'sed'; did you mean 'seed'?"),
    ("synth.frmes=4", "did you mean 'synth.frames'?"),
    ("data.size=big", "config key 'data.size'"),
    ("novalue", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_empty_override_clears_a_string():
    cfg = load_config(None, ["data.test=x.json", "data.test="])
    assert cfg.data.test == ""


def test_unknown_key_in_preset_file_and_unknown_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  tokeniser: x\n")
    with pytest.raises(ConfigError, match="did you mean 'data.tokenizer'"):
        load_config(preset)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no_such_preset")


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["data.num_frames=2"])
    path = save_config(cfg, tmp_path)
    assert load_config(path) == cfg
    assert OmegaConf.load(path).data.num_frames == 2
