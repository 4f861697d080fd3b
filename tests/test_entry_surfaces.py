"""The host-free WebUI glue: settings round trips, XYZ axes, control specs, schema, tile map."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from accdiffusion.entry import surfaces as glue
from accdiffusion.method.settings import (FIELD_BY_NAME, FIELDS, AccDiffusionSettings, SettingsError,
                                          infotext_key)
from accdiffusion.method.tilemap import draw_tile_prompt_map, wrap_text
from accdiffusion.method.tiles import Window, window_grid

CUSTOM = AccDiffusionSettings(enabled=True, patch_prompts=False, patch_prompt_threshold=0.45,
                              window_interaction=False, cosine_scale_1=2.5, sigma=0.0,
                              window_size=96, stride=48, tile_batch_size=8, progressive=False,
                              tiled_decode="on", tile_prompt_map=True, window_mode="shifted",
                              prompt_units="words")


def _infotext_roundtrip(settings):
    """infotext_params -> the string the WebUI writes -> parsed params (strings) -> paste readers."""
    text = ", ".join(f"{k}: {v}" for k, v in settings.infotext_params().items())
    params = {}
    for part in text.split(", ") if text else []:
        key, _, value = part.partition(": ")
        params[key] = value
    params.update({"Steps": "20", "Seed": "1"})
    return params, glue.settings_from_pasted(params)


@pytest.mark.parametrize("settings", [AccDiffusionSettings(), AccDiffusionSettings(enabled=True), CUSTOM])
def test_round_trips(settings):
    positional = settings.to_positional()
    assert glue.job_settings(positional, None) == settings
    assert glue.job_settings([settings.to_dict()], None) == settings
    params, pasted = _infotext_roundtrip(settings)
    if settings.enabled:
        assert pasted == settings
    else:
        assert pasted == AccDiffusionSettings()  # a disabled job writes nothing
    assert all(isinstance(v, str) for v in params.values())


def test_paste_readers_give_real_types():
    params = {"AccDiffusion": "True", "AccDiffusion patch prompts": "False",
              "AccDiffusion patch prompt threshold": "0.5", "AccDiffusion window size": "64",
              "AccDiffusion tiled decode": "Off"}
    read = {f.name: glue.paste_reader(f)(params) for f in FIELDS}
    assert read["enabled"] is True
    assert read["patch_prompts"] is False  # bool("False") would be True
    assert read["patch_prompt_threshold"] == 0.5 and isinstance(read["patch_prompt_threshold"], float)
    assert read["window_size"] == 64 and type(read["window_size"]) is int
    assert read["tiled_decode"] == "off"
    assert read["dilated_sampling"] is True  # absent -> default
    assert glue.paste_reader(FIELD_BY_NAME["enabled"])({"Steps": "20"}) is False
    assert glue.paste_reader(FIELD_BY_NAME["sigma"])({"AccDiffusion sigma": "lots"}) is None
    assert glue.paste_field_names() == [infotext_key(f) for f in FIELDS]
    assert glue.paste_field_names()[0] == "AccDiffusion"


def test_api_dict_followed_by_padding():
    """The API copies alwayson args over the positional defaults: a dict then defaults."""
    padded = [{"enabled": True, "sigma": 1.5}] + AccDiffusionSettings().to_positional()[1:]
    assert glue.job_settings(padded, None) == AccDiffusionSettings(enabled=True, sigma=1.5)
    with pytest.raises(SettingsError, match="unknown setting"):
        glue.job_settings([{"enabled": True, "sigm": 1.5}], None)


def test_short_positional_and_overrides():
    assert glue.job_settings([True], None) == AccDiffusionSettings(enabled=True)
    s = glue.job_settings(AccDiffusionSettings().to_positional(), {"enabled": True, "sigma": 2.0})
    assert s.enabled and s.sigma == 2.0
    with pytest.raises(SettingsError, match="sigma"):
        glue.job_settings([True], {"sigma": 9.0})
    with pytest.raises(SettingsError, match="unknown override"):
        glue.job_settings([True], {"nope": 1})
    with pytest.raises(SettingsError, match="stride"):
        glue.job_settings([True], {"window_size": 32, "stride": 64})


def test_requested_enabled():
    assert glue.requested_enabled([False, 0.3], None) is False
    assert glue.requested_enabled([True, "bad"], None) is True
    assert glue.requested_enabled([{"enabled": False, "bad": 1}], None) is False
    assert glue.requested_enabled([False], {"enabled": True}) is True
    assert glue.requested_enabled([], None) is False
    assert glue.requested_enabled(["maybe"], None) is True


def test_xyz_specs():
    specs = {s.name: s for s in glue.xyz_axis_specs()}
    assert set(specs) == {f.name for f in FIELDS if f.xyz}
    assert specs["enabled"].label == "AccDiffusion"
    assert specs["patch_prompt_threshold"].label == "AccDiffusion Patch prompt threshold"
    assert len({s.label for s in specs.values()}) == len(specs)
    assert specs["patch_prompt_threshold"].type is float
    assert specs["window_size"].type is int
    assert specs["patch_prompts"].type is str
    assert specs["patch_prompts"].choices() == ["True", "False"]
    assert specs["patch_prompt_threshold"].choices is None
    assert specs["window_mode"].type is str and specs["window_mode"].choices() == ["overlap", "shifted"]
    assert specs["window_mode"].label == "AccDiffusion Window mode"
    assert specs["prompt_units"].label == "AccDiffusion Prompt units"
    assert specs["prompt_units"].type is str and specs["prompt_units"].choices() == ["phrases", "words"]


def test_xyz_apply_does_not_share_dicts():
    specs = {s.name: s for s in glue.xyz_axis_specs()}
    base = types.SimpleNamespace(steps=20)
    cell1, cell2 = types.SimpleNamespace(**vars(base)), types.SimpleNamespace(**vars(base))
    specs["patch_prompt_threshold"].apply(cell1, 0.4, [0.4, 0.6])
    specs["patch_prompt_threshold"].apply(cell2, 0.6, [0.4, 0.6])
    assert cell1.accdiffusion_overrides == {"patch_prompt_threshold": 0.4, "enabled": True}
    assert cell2.accdiffusion_overrides == {"patch_prompt_threshold": 0.6, "enabled": True}
    assert not hasattr(base, "accdiffusion_overrides")

    # a shallow copy of a p that already has overrides: the original's dict is never mutated
    shared = {"sigma": 1.0, "enabled": True}
    p = types.SimpleNamespace(accdiffusion_overrides=shared)
    specs["patch_prompts"].apply(p, "False", ["True", "False"])
    assert shared == {"sigma": 1.0, "enabled": True}
    assert p.accdiffusion_overrides == {"sigma": 1.0, "enabled": True, "patch_prompts": False}

    # an explicit "enabled" axis wins whatever the axis order
    p = types.SimpleNamespace()
    specs["enabled"].apply(p, "False", ["True", "False"])
    specs["sigma"].apply(p, 0.5, [0.5])
    assert p.accdiffusion_overrides == {"enabled": False, "sigma": 0.5}
    p = types.SimpleNamespace()
    specs["sigma"].apply(p, 0.5, [0.5])
    specs["enabled"].apply(p, "False", ["True", "False"])
    assert p.accdiffusion_overrides == {"enabled": False, "sigma": 0.5}
    assert glue.job_settings([False], p.accdiffusion_overrides).enabled is False

    # int axis values arrive as int from xyz's range parser; floats are coerced
    p = types.SimpleNamespace()
    specs["window_size"].apply(p, 64, [64])
    assert type(p.accdiffusion_overrides["window_size"]) is int


def test_xyz_confirm():
    specs = {s.name: s for s in glue.xyz_axis_specs()}
    specs["patch_prompt_threshold"].confirm(None, [0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="patch_prompt_threshold") as info:
        specs["patch_prompt_threshold"].confirm(None, [0.5, 1.0])
    assert "(0, 1)" in str(info.value)
    with pytest.raises(ValueError, match="multiple of 8"):
        specs["window_size"].confirm(None, [64, 20])
    specs["window_size"].confirm(None, [0, 64])
    specs["window_mode"].confirm(None, ["overlap", "shifted"])
    with pytest.raises(ValueError, match="'overlap', 'shifted'"):
        specs["window_mode"].confirm(None, ["shifted", "spiral"])
    with pytest.raises(ValueError, match="true or false"):
        specs["dilated_sampling"].confirm(None, ["True", "Maybe"])
    assert glue.parse_bool("false") is False and glue.parse_bool("TRUE") is True
    specs["prompt_units"].confirm(None, ["phrases", "words"])
    with pytest.raises(ValueError, match="'phrases', 'words'"):
        specs["prompt_units"].confirm(None, ["phrases", "sentences"])


def test_control_specs():
    specs = {f.name: glue.control_spec(f) for f in FIELDS}
    c = specs["patch_prompt_threshold"]
    assert (c.component, c.minimum, c.maximum, c.step, c.value) == ("slider", 0.01, 0.99, 0.01, 0.3)
    ws = specs["window_size"]
    assert (ws.component, ws.minimum, ws.maximum, ws.step, ws.value) == ("slider", 0, 512, 8, 0)
    st = specs["stride"]
    assert (st.minimum, st.maximum, st.step) == (0, 512, 8)
    tb = specs["tile_batch_size"]
    assert (tb.minimum, tb.maximum, tb.step, tb.value) == (0, 64, 1, 0)
    assert specs["window_mode"].component == "radio"
    assert specs["window_mode"].choices == ("overlap", "shifted") and specs["window_mode"].value == "shifted"
    assert specs["tiled_decode"].component == "radio"
    assert specs["prompt_units"].component == "radio" and specs["prompt_units"].value == "phrases"
    assert specs["prompt_units"].choices == ("phrases", "words")
    assert "prompt_units" in [f.name for f in glue.advanced_fields()]
    assert specs["tiled_decode"].choices == ("auto", "on", "off")
    assert specs["patch_prompts"].component == "checkbox" and specs["patch_prompts"].value is True
    for f in FIELDS:
        s = specs[f.name]
        assert s.label == f.label and s.tooltip == f.tooltip
        if s.component == "slider":
            assert s.minimum <= s.value <= s.maximum
            # every default sits on the slider's grid
            assert abs(round((s.value - s.minimum) / s.step) * s.step - (s.value - s.minimum)) < 1e-9
            # the slider's ends are valid values
            glue.coerce_value(f, s.maximum)
            if not f.zero_means:
                glue.coerce_value(f, s.minimum)
    assert [f.name for f in glue.everyday_fields()] == [
        "patch_prompts", "patch_prompt_threshold", "dilated_sampling", "window_interaction"]
    names = ["enabled"] + [f.name for f in glue.everyday_fields() + glue.advanced_fields()]
    assert sorted(names) == sorted(f.name for f in FIELDS)
    assert len({s.label for s in specs.values()}) == len(specs)


def _accepted(name, value):
    try:
        AccDiffusionSettings.from_dict({name: value})
        return True
    except SettingsError:
        return False


def test_schema_endpoint():
    # what the endpoint serves must describe what the settings model accepts
    body = glue.settings_schema()
    assert set(body["properties"]) == {f.name for f in FIELDS}
    defaults = AccDiffusionSettings().to_dict()
    assert {name: prop["default"] for name, prop in body["properties"].items()} == defaults
    assert body["additionalProperties"] is False and not _accepted("no_such_setting", 1)
    for name, prop in body["properties"].items():
        if prop["type"] == "boolean":
            assert _accepted(name, True) and _accepted(name, False)
        elif prop["type"] == "string":
            assert all(_accepted(name, choice) for choice in prop["enum"])
            assert not _accepted(name, "no-such-choice")
        elif "exclusiveMinimum" in prop:
            lo, hi = prop["exclusiveMinimum"], prop["exclusiveMaximum"]
            assert not _accepted(name, lo) and not _accepted(name, hi)
            assert _accepted(name, lo + (hi - lo) / 3)
        elif "anyOf" in prop:
            zero, span = prop["anyOf"]
            assert zero == {"const": 0} and _accepted(name, 0)
            assert _accepted(name, span["minimum"]) and _accepted(name, span["maximum"])
            step = span.get("multipleOf", 1)
            assert not _accepted(name, span["maximum"] + step)
            if step > 1:
                assert not _accepted(name, span["minimum"] + step // 2)
            else:  # no step rule: below the minimum (but not 0) is refused
                assert span["minimum"] > 1 or not _accepted(name, -1)
        else:
            lo, hi = prop["minimum"], prop["maximum"]
            assert _accepted(name, lo) and _accepted(name, hi)
            step = 1 if prop["type"] == "integer" else 0.01
            assert not _accepted(name, lo - step) and not _accepted(name, hi + step)
    assert body["properties"]["patch_prompt_threshold"]["exclusiveMaximum"] == 1.0
    import json
    json.dumps(body)
    assert glue.SCHEMA_ROUTE == "/accdiffusion/v1/settings"


def test_hires_note_html():
    html = glue.hires_note_html("script_accdiffusion_enabled")
    assert 'id="accdiffusion-hires-note"' in html and "display:none" in html
    assert 'data-accordion="script_accdiffusion_enabled"' in html
    assert "Hires. fix is off" in html


# --- tile-prompt map --------------------------------------------------------------------------------

def _source(size=(64, 48)):
    img = Image.new("RGB", size)
    img.putdata([((x * 4) % 256, (y * 5) % 256, 128) for y in range(size[1]) for x in range(size[0])])
    return img


def test_tile_prompt_map_draws_windows():
    latent = (24, 32)  # H, W -> 256x192 px
    windows = window_grid(latent[0], latent[1], (16, 16), (8, 8))
    prompts = ["a cat, sitting on a very long sofa in a living room with a lamp"] + [""] * (len(windows) - 2) + ["dog"]
    source = _source()
    out = draw_tile_prompt_map(source, windows, prompts, latent)
    assert out.size == (256, 192) and out.mode == "RGB"
    plain = source.resize(out.size, Image.LANCZOS)
    diff = ImageChops.difference(out, plain).convert("L")
    for w in windows:  # every window's area is changed (fill, outline, text)
        box = (w.left * 8, w.top * 8, (w.left + w.width) * 8, (w.top + w.height) * 8)
        assert diff.crop(box).getbbox() is not None
    # the interior of a window away from text and outlines is tinted, not replaced
    x, y = 11 * 8, 5 * 8 + 4
    assert out.getpixel((x, y)) != plain.getpixel((x, y))
    assert max(abs(a - b) for a, b in zip(out.getpixel((x, y)), plain.getpixel((x, y)))) < 80


def test_tile_prompt_map_caps_size_and_checks_input():
    windows = [Window(0, 0, 256, 256), Window(0, 128, 256, 256), Window(128, 0, 256, 256), Window(128, 128, 256, 256)]
    out = draw_tile_prompt_map(_source(), windows, ["a", "b", "c", "d"], (384, 384))
    assert out.size == (2048, 2048)
    out = draw_tile_prompt_map(_source(), windows, ["a", "b", "c", "d"], (384, 384), max_side=512)
    assert out.size == (512, 512)
    with pytest.raises(ValueError, match="prompts"):
        draw_tile_prompt_map(_source(), windows, ["a"], (384, 384))
    # non-Latin-1 text and an RGBA source do not break drawing
    draw_tile_prompt_map(_source().convert("RGBA"), windows[:1], ["猫 \u2026 café"], (256, 256))


def test_wrap_text():
    from PIL import ImageDraw, ImageFont
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = ImageFont.load_default()
    lines = wrap_text(draw, "one two three four five six seven " + "x" * 60, font, 60)
    assert len(lines) > 2
    assert all(draw.textbbox((0, 0), line, font=font)[2] <= 60 for line in lines)
    assert "".join(lines).replace(" ", "").endswith("x" * 60)


# --- the script file with stand-in WebUI modules ----------------------------------------------------

class _Component:
    def __init__(self, *args, **kwargs):
        self.kwargs = kwargs
        self.value = kwargs.get("value", args[0] if args else None)
        self.label = kwargs.get("label")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _stand_in_modules(monkeypatch):
    gr = types.ModuleType("gradio")
    gr.built = []
    for name in ("Checkbox", "Slider", "Radio", "HTML", "Row", "Accordion"):
        def init(self, *args, _name=name, **kwargs):
            _Component.__init__(self, *args, **kwargs)
            gr.built.append(_name)
        setattr(gr, name, type(name, (_Component,), {"__init__": init}))
    modules = types.ModuleType("modules")
    scripts = types.ModuleType("modules.scripts")
    scripts.AlwaysVisible = object()
    scripts.scripts_data = []

    class Script:
        is_img2img = False

        def elem_id(self, item_id):
            return f"script_accdiffusion_{item_id}"

    scripts.Script = Script
    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.registered = []
    callbacks.on_before_ui = lambda fn: callbacks.registered.append(("before_ui", fn))
    callbacks.on_app_started = lambda fn: callbacks.registered.append(("app_started", fn))
    ui_components = types.ModuleType("modules.ui_components")
    ui_components.InputAccordion = type("InputAccordion", (_Component,), {})
    modules.scripts, modules.script_callbacks, modules.ui_components = scripts, callbacks, ui_components
    for name, mod in {"gradio": gr, "modules": modules, "modules.scripts": scripts,
                      "modules.script_callbacks": callbacks, "modules.ui_components": ui_components}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return scripts, callbacks


def test_script_with_stand_ins(monkeypatch):
    scripts, callbacks = _stand_in_modules(monkeypatch)
    xyz = types.ModuleType("xyz_grid.py")

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label, self.type, self.apply, self.confirm, self.choices = label, type, apply, confirm, choices

    xyz.AxisOption, xyz.AxisOptionTxt2Img = AxisOption, type("AxisOptionTxt2Img", (AxisOption,), {})
    xyz.axis_options = [AxisOption("Nothing", str, None)]
    xyz_class = type("Script", (), {"__module__": "xyz_grid.py"})
    scripts.scripts_data.append(types.SimpleNamespace(script_class=xyz_class, module=xyz))

    path = Path(__file__).resolve().parents[1] / "scripts" / "accdiffusion.py"
    spec = importlib.util.spec_from_file_location("accdiffusion.py", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    n_axes = len(xyz.axis_options)
    assert n_axes == 1 + sum(f.xyz for f in FIELDS)
    # plain AxisOption: xyz_grid offers exactly those in both tabs (xyz_grid.py:420)
    assert all(type(o) is AxisOption for o in xyz.axis_options)
    dict(callbacks.registered)["before_ui"]()  # registering again adds nothing
    assert len(xyz.axis_options) == n_axes

    script = module.AccDiffusionScript()
    assert script.title() == "AccDiffusion"
    assert script.show(False) is scripts.AlwaysVisible and script.show(True) is scripts.AlwaysVisible
    gr = sys.modules["gradio"]
    img2img_controls = script.ui(True)
    assert "HTML" not in gr.built  # the hires note is txt2img's only
    assert [c.value for c in img2img_controls] == AccDiffusionSettings().to_positional()
    controls = script.ui(False)
    assert "HTML" in gr.built
    assert [c.value for c in controls] == AccDiffusionSettings().to_positional()
    assert [c.kwargs["elem_id"] for c in controls][:2] == ["script_accdiffusion_enabled",
                                                            "script_accdiffusion_patch_prompts"]
    assert len(script.infotext_fields) == len(FIELDS)
    assert script.infotext_fields[0][0] is controls[0]
    assert script.paste_field_names[0] == "AccDiffusion"
    assert script.ui(False)[0] is not controls[0]  # a second call builds fresh controls

    calls = []
    fake_adapter = types.ModuleType("accdiffusion.entry.facade")
    fake_adapter.start_job = lambda p, s: (calls.append(("start", s)), setattr(p, "accdiffusion_job", object()))
    fake_adapter.fail_job = lambda p, e: calls.append(("fail", str(e)))
    fake_adapter.before_batch = lambda p: calls.append(("batch",))
    fake_adapter.finish_job = lambda p, processed: calls.append(("finish", processed))
    monkeypatch.setitem(sys.modules, "accdiffusion.entry.facade", fake_adapter)
    import accdiffusion.entry  # `from accdiffusion.entry import facade` reads the package attribute once imported
    monkeypatch.setattr(accdiffusion.entry, "facade", fake_adapter, raising=False)

    p = types.SimpleNamespace()
    args = AccDiffusionSettings().to_positional()
    script.process(p, *args)
    script.before_process_batch(p, *args, batch_number=0)
    script.postprocess(p, "processed", *args)
    assert calls == []  # disabled: nothing happens

    p = types.SimpleNamespace()
    xyz.axis_options[3].apply(p, 0.5, [0.5])  # patch prompt threshold enables it
    script.process(p, *args)
    script.before_process_batch(p, *args, batch_number=0)
    script.postprocess(p, "processed", *args)
    assert [c[0] for c in calls] == ["start", "batch", "finish"]
    assert calls[0][1] == AccDiffusionSettings(enabled=True, patch_prompt_threshold=0.5)

    calls.clear()  # the prompt-units axis, as registered with xyz_grid, reaches the job's settings
    units_axis = next(o for o in xyz.axis_options if o.label == "AccDiffusion Prompt units")
    assert units_axis.choices() == ["phrases", "words"]
    p = types.SimpleNamespace()
    units_axis.apply(p, "words", ["phrases", "words"])
    script.process(p, *args)
    assert calls == [("start", AccDiffusionSettings(enabled=True, prompt_units="words"))]

    calls.clear()
    bad = list(AccDiffusionSettings(enabled=True).to_positional())
    bad[FIELDS.index(FIELD_BY_NAME["window_size"])] = 8
    script.process(types.SimpleNamespace(), *bad)
    assert calls and calls[0][0] == "fail" and "window_size" in calls[0][1]
    calls.clear()
    bad[0] = False
    script.process(types.SimpleNamespace(), *bad)  # disabled: invalid values are ignored
    assert calls == []
