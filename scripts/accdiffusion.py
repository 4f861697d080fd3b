"""AccDiffusion for AUTOMATIC1111 / Forge: the thin WebUI glue.

UI, infotext paste, X/Y/Z axes and the settings endpoint. The logic lives in
``accdiffusion.entry.surfaces`` (host-free) and ``accdiffusion.entry.facade`` (imported lazily,
only when a job needs it).
"""

import os
import sys

import gradio as gr

from modules import script_callbacks, scripts
from modules.ui_components import InputAccordion

_EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXT_ROOT not in sys.path:
    sys.path.insert(0, _EXT_ROOT)

from accdiffusion.entry import surfaces as glue  # noqa: E402
from accdiffusion.method.settings import FIELDS, SettingsError  # noqa: E402

try:
    from modules.infotext_utils import PasteField
except ImportError:  # older hosts take plain (component, target) pairs
    def PasteField(component, target, **_):  # noqa: N802
        return component, target


def _control(script, spec):
    common = dict(label=spec.label, value=spec.value, tooltip=spec.tooltip,
                  elem_id=script.elem_id(spec.name))
    if spec.component == "checkbox":
        return gr.Checkbox(**common)
    if spec.component == "radio":
        return gr.Radio(choices=list(spec.choices), **common)
    return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step, **common)


def _controls(script, fields, into):
    """Checkboxes in one row, the rest two to a row."""
    specs = [glue.control_spec(f) for f in fields]
    flags = [s for s in specs if s.component == "checkbox"]
    others = [s for s in specs if s.component != "checkbox"]
    if flags:
        with gr.Row():
            for spec in flags:
                into[spec.name] = _control(script, spec)
    for start in range(0, len(others), 2):
        with gr.Row():
            for spec in others[start:start + 2]:
                into[spec.name] = _control(script, spec)


class AccDiffusionScript(scripts.Script):
    section = "accordions"
    create_group = False

    def title(self):
        return glue.TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible  # txt2img (hires fix, Upscale button) and img2img

    def ui(self, is_img2img):
        controls = {}
        accordion_id = self.elem_id("enabled")
        with InputAccordion(False, label=glue.TITLE, elem_id=accordion_id) as enabled:
            controls["enabled"] = enabled
            note = _unknown_host_note()
            if note:  # a WebUI no backend serves: the extension leaves every job as it is
                gr.HTML(value=f"<p>{note}</p>", elem_id=self.elem_id("host_note"))
            if not is_img2img:  # img2img needs no hires fix
                gr.HTML(value=glue.hires_note_html(accordion_id), elem_id=self.elem_id("hires_note"))
            _controls(self, glue.everyday_fields(), controls)
            with gr.Accordion("Advanced", open=False, elem_id=self.elem_id("advanced")):
                _controls(self, glue.advanced_fields(), controls)

        self.infotext_fields = [PasteField(controls[f.name], glue.paste_reader(f)) for f in FIELDS]
        self.paste_field_names = glue.paste_field_names()
        return [controls[f.name] for f in FIELDS]

    def process(self, p, *args):
        overrides = getattr(p, glue.OVERRIDES_ATTR, None)
        try:
            settings = glue.job_settings(args, overrides)
        except SettingsError as error:
            if not glue.requested_enabled(args, overrides):
                print(f"[AccDiffusion] disabled; ignoring invalid settings: {error}")
                return
            from accdiffusion.entry import facade
            facade.fail_job(p, error)
            return
        if settings.enabled:
            from accdiffusion.entry import facade
            facade.start_job(p, settings)

    def before_process_batch(self, p, *args, **kwargs):
        if getattr(p, glue.JOB_ATTR, None) is not None:
            from accdiffusion.entry import facade
            facade.before_batch(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        if getattr(p, glue.JOB_ATTR, None) is not None:
            from accdiffusion.entry import facade
            facade.before_sampling(p)

    def postprocess(self, p, processed, *args):
        if getattr(p, glue.JOB_ATTR, None) is not None:
            from accdiffusion.entry import facade
            facade.finish_job(p, processed)


def _xyz_module():
    for data in scripts.scripts_data:
        if data.script_class.__module__ == "xyz_grid.py":
            return data.module
    return None


def register_xyz_axes():
    xyz = _xyz_module()
    if xyz is None:
        return
    option = xyz.AxisOption  # both tabs (AxisOptionTxt2Img / AxisOptionImg2Img would pick one)
    known = {getattr(o, "label", None) for o in xyz.axis_options}
    for spec in glue.xyz_axis_specs():
        if spec.label not in known:
            xyz.axis_options.append(option(spec.label, spec.type, spec.apply, confirm=spec.confirm,
                                           choices=spec.choices))


def on_app_started(demo, app):
    if any(getattr(route, "path", None) == glue.SCHEMA_ROUTE for route in app.routes):
        return

    def accdiffusion_settings_schema():
        return glue.settings_schema()

    app.add_api_route(glue.SCHEMA_ROUTE, accdiffusion_settings_schema, methods=["GET"])


def _unknown_host_note():
    try:
        from accdiffusion.entry import facade
        return facade.unknown_host_note()
    except Exception as e:  # never keep the accordion from showing
        return f"AccDiffusion could not read this WebUI ({e}); it leaves every job as it is."


# At load, once: which backend serves this WebUI (the choice is made by what the host has)
try:
    from accdiffusion.entry import facade as _facade
    _facade.announce_host()
except Exception as e:  # never keep the script from loading
    print(f"[AccDiffusion] could not read this WebUI: {e}")

# At import (API-only mode builds the UI before on_before_ui) and before the UI; deduplicated.
try:
    register_xyz_axes()
except Exception as e:  # never keep the script from loading
    print(f"[AccDiffusion] could not add X/Y/Z plot axes: {e}")
script_callbacks.on_before_ui(register_xyz_axes)
script_callbacks.on_app_started(on_app_started)
