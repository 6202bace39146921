import dataclasses
import json

import pytest

from slsg.data.synthesis import CATEGORY_PRESETS, PRESETS, SynthesisConfig, get_preset, preset_for_category


def test_defaults_follow_the_method():
    c = SynthesisConfig()
    assert c.self_content_prob == 0.58 and c.min_pixels == 49 and c.rotation_deg == 90.0
    assert (c.texture_perlin_scale, c.texture_threshold, c.texture_beta) == (4, 0.5, (0.0, 0.9))
    assert (c.self_perlin_scale, c.self_threshold, c.self_beta) == (3, 0.4, (0.0, 0.25))
    assert c.texture_num_augmentations == 3 and c.self_grid == (4, 8)
    assert PRESETS["default"] == c


def test_presets_cover_kinds_and_loco():
    for name in ("default", "texture", "object", "breakfast_box", "juice_bottle", "pushpins", "screw_bag",
                 "splicing_connectors"):
        assert isinstance(PRESETS[name], SynthesisConfig)
    assert PRESETS["object"].foreground == "border"
    assert PRESETS["texture"].self_content_prob < PRESETS["default"].self_content_prob
    assert all(PRESETS[c].self_content_prob >= 0.58 for c in ("breakfast_box", "pushpins", "screw_bag"))
    assert preset_for_category("bottle") is PRESETS["object"]
    assert preset_for_category("Carpet") is PRESETS["texture"]
    assert preset_for_category("pushpins") is PRESETS["pushpins"]
    assert preset_for_category("my_widget") is PRESETS["default"]
    assert get_preset("mtd") is PRESETS["texture"]
    assert set(CATEGORY_PRESETS.values()) <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown synthesis preset"):
        get_preset("nope")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name, tmp_path):
    config = PRESETS[name]
    assert SynthesisConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["self_grid"] == list(config.self_grid)
    path = config.save(tmp_path / "synthesis.json")
    assert SynthesisConfig.load(path) == config
    assert not [p for p in tmp_path.iterdir() if p.name != "synthesis.json"]  # no temp files left


def test_lists_become_tuples():
    c = SynthesisConfig(texture_beta=[0.1, 0.5], self_grid=[2, 2])
    assert c.texture_beta == (0.1, 0.5) and c.self_grid == (2, 2) and hash(c)


def test_partial_dict_takes_defaults_and_unknown_keys_fail():
    assert SynthesisConfig.from_dict({"self_content_prob": 0.3}) == SynthesisConfig(self_content_prob=0.3)
    with pytest.raises(ValueError, match="unknown SynthesisConfig fields"):
        SynthesisConfig.from_dict({"self_content_probability": 0.3})
    with pytest.raises(ValueError, match="invalid SynthesisConfig JSON"):
        SynthesisConfig.from_json("{not json")


def test_load_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"min_pixels": -3}')
    with pytest.raises(ValueError, match="bad.json"):
        SynthesisConfig.load(bad)
    with pytest.raises(ValueError, match="cannot read"):
        SynthesisConfig.load(tmp_path / "missing.json")


@pytest.mark.parametrize("changes,match", [
    ({"self_content_prob": 1.5}, "self_content_prob"),
    ({"texture_beta": (0.9, 0.1)}, "texture_beta"),
    ({"texture_beta": (0.0, 0.5, 0.9)}, "texture_beta"),
    ({"texture_augmentations": ("invert", "blur")}, "texture_augmentations"),
    ({"texture_num_augmentations": 20}, "texture_num_augmentations"),
    ({"self_grid": (1, 1)}, "self_grid"),
    ({"foreground": "saliency"}, "foreground"),
    ({"foreground_branches": ("structural",)}, "foreground_branches"),
    ({"texture_perlin_scale": 0}, "texture_perlin_scale"),
    ({"self_threshold": 1.2}, "self_threshold"),
    ({"min_pixels": 0}, "min_pixels"),
    ({"procedural_textures": ()}, "procedural_textures"),
])
def test_invalid_values_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        SynthesisConfig(**changes)


def test_presets_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["default"].self_content_prob = 0.1  # type: ignore[misc]
    changed = PRESETS["default"].replace(self_content_prob=0.1)
    assert changed.self_content_prob == 0.1 and PRESETS["default"].self_content_prob == 0.58
