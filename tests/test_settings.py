import json

import pytest

from accdiffusion.method.settings import (FIELDS, AccDiffusionSettings, SettingsError, infotext_key,
                                          json_schema)


def test_defaults_match_the_contract():
    s = AccDiffusionSettings()
    assert s.to_dict() == {
        "enabled": False, "patch_prompts": True, "patch_prompt_threshold": 0.3,
        "dilated_sampling": True, "window_interaction": True, "skip_residual": True,
        "cosine_scale_1": 3.0, "cosine_scale_2": 1.0, "cosine_scale_3": 1.0, "sigma": 0.8,
        "window_size": 0, "stride": 0, "tile_batch_size": 0, "progressive": True,
        "tiled_decode": "auto", "tile_prompt_map": False, "window_mode": "shifted",
        "prompt_units": "phrases", "window_grain": 1}


@pytest.mark.parametrize("name,value,needle", [
    ("patch_prompt_threshold", 1.0, "(0, 1)"),
    ("patch_prompt_threshold", 0, "(0, 1)"),
    ("tile_batch_size", -1, "0 (automatic) or an integer in [1, 64]"),
    ("tile_batch_size", 65, "[1, 64]"),
    ("window_mode", "spiral", "'overlap', 'shifted'"),
    ("prompt_units", "sentences", "'phrases', 'words'"),
    ("tile_batch_size", 2.5, "an integer"),
    ("window_size", 20, "multiple of 8"),
    ("tiled_decode", "maybe", "'auto', 'on', 'off'"),
    ("enabled", "yes", "true or false"),
    ("sigma", float("nan"), "[0, 3]"),
    ("cosine_scale_1", True, "[0, 10]"),
])
def test_bad_values_name_field_value_and_range(name, value, needle):
    with pytest.raises(SettingsError) as err:
        AccDiffusionSettings(**{name: value})
    message = str(err.value)
    assert f"'{name}'" in message and repr(value) in message and needle in message


def test_stride_larger_than_window_is_rejected():
    with pytest.raises(SettingsError, match="stride"):
        AccDiffusionSettings(window_size=64, stride=72)


def test_from_dict_takes_defaults_and_rejects_unknown_names():
    s = AccDiffusionSettings.from_dict({"enabled": True, "sigma": 1})
    assert s.enabled and s.sigma == 1.0 and s.stride == 0
    with pytest.raises(SettingsError) as err:
        AccDiffusionSettings.from_dict({"enabled": True, "treshold": 0.4})
    assert "'treshold'" in str(err.value)
    assert all(f.name in str(err.value) for f in FIELDS)


def test_positional_and_dict_round_trip():
    s = AccDiffusionSettings(enabled=True, patch_prompt_threshold=0.45, window_size=64, stride=32,
                             tiled_decode="on")
    assert AccDiffusionSettings.from_positional(s.to_positional()) == s
    assert AccDiffusionSettings.from_script_args([s.to_dict()]) == s
    assert AccDiffusionSettings.from_script_args(s.to_positional()) == s
    with pytest.raises(SettingsError):
        AccDiffusionSettings.from_positional([True] * (len(FIELDS) + 1))


def test_infotext_writes_only_changed_settings_and_round_trips():
    assert AccDiffusionSettings().infotext_params() == {}
    s = AccDiffusionSettings(enabled=True, sigma=1.2, progressive=False)
    params = s.infotext_params()
    assert params == {"AccDiffusion": True, "AccDiffusion sigma": 1.2,
                      "AccDiffusion progressive upscale": False, "AccDiffusion window mode": "shifted", "AccDiffusion window grain": 1}
    # the WebUI hands pasted values back as strings
    assert AccDiffusionSettings.from_infotext({k: str(v) for k, v in params.items()}) == s
    keys = [infotext_key(f) for f in FIELDS]
    assert len(set(keys)) == len(keys)


def test_schema_lists_every_field_with_defaults_and_ranges():
    schema = json.loads(json.dumps(json_schema()))
    props = schema["properties"]
    assert list(props) == [f.name for f in FIELDS]
    assert props["patch_prompt_threshold"]["exclusiveMinimum"] == 0.0
    assert props["patch_prompt_threshold"]["default"] == 0.3
    assert props["tiled_decode"]["enum"] == ["auto", "on", "off"]
    assert props["window_size"]["anyOf"][0] == {"const": 0}
    assert props["tile_batch_size"]["anyOf"][0] == {"const": 0} and props["tile_batch_size"]["default"] == 0
    assert props["window_mode"]["enum"] == ["overlap", "shifted"]
    assert schema["additionalProperties"] is False


def test_window_mode_and_automatic_batch_round_trip():
    s = AccDiffusionSettings(enabled=True, window_mode=" Shifted ", tile_batch_size=0)
    assert s.window_mode == "shifted" and s.tile_batch_size == 0
    params = s.infotext_params()
    # the automatic batch is the default: the infotext only names a batch the user set; the grain
    # is always named (an infotext without it stands for the grain before the setting existed)
    assert params == {"AccDiffusion": True, "AccDiffusion window mode": "shifted", "AccDiffusion window grain": 1}
    assert AccDiffusionSettings.from_infotext({k: str(v) for k, v in params.items()}) == s
    explicit = s.replace(tile_batch_size=6)
    assert explicit.infotext_params()["AccDiffusion tile batch size"] == 6
    assert AccDiffusionSettings.from_dict({"window_mode": "overlap", "tile_batch_size": 3}).tile_batch_size == 3


def test_prompt_units_round_trip_through_dict_positional_and_infotext():
    s = AccDiffusionSettings(enabled=True, prompt_units=" Words ")
    assert s.prompt_units == "words"
    # newer settings come last, so positional API calls of earlier versions keep their meaning
    assert [f.name for f in FIELDS[-2:]] == ["prompt_units", "window_grain"]
    assert AccDiffusionSettings.from_positional(s.to_positional()) == s
    assert AccDiffusionSettings.from_dict({"enabled": True, "prompt_units": "words"}) == s
    params = s.infotext_params()
    assert params == {"AccDiffusion": True, "AccDiffusion prompt units": "words", "AccDiffusion window mode": "shifted", "AccDiffusion window grain": 1}
    assert AccDiffusionSettings.from_infotext({k: str(v) for k, v in params.items()}) == s
    # the default is not written, and an infotext without the key reads as the default (the window
    # mode and grain are always named where they matter: their absence stands for the old behaviour)
    assert AccDiffusionSettings(enabled=True).infotext_params() == {"AccDiffusion": True, "AccDiffusion window mode": "shifted", "AccDiffusion window grain": 1}
    assert AccDiffusionSettings.from_infotext({"AccDiffusion": "True"}).prompt_units == "phrases"
    assert json_schema()["properties"]["prompt_units"]["enum"] == ["phrases", "words"]
