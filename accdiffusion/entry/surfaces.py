"""Host-free pieces of the WebUI glue (``scripts/accdiffusion.py``).

Everything here is plain data and functions over ``accdiffusion.method.settings``: the control specs the
UI builds from ``FIELDS``, the infotext paste readers, the X/Y/Z axis specs, how a job's settings
are assembled from script args plus per-cell XYZ overrides, and the settings-schema payload. No
``modules.*`` import, so it is unit-testable without the WebUI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..method.settings import (FIELD_BY_NAME, FIELDS, INFOTEXT_PREFIX, AccDiffusionSettings, Field,
                               SettingsError, infotext_key, json_schema)

TITLE = "AccDiffusion"
OVERRIDES_ATTR = "accdiffusion_overrides"  # dict name -> value set by XYZ axes on a cell's p
JOB_ATTR = "accdiffusion_job"  # set on p by facade.start_job (the same as job.JOB_ATTR)
SCHEMA_ROUTE = "/accdiffusion/v1/settings"
HIRES_NOTE_ID = "accdiffusion-hires-note"
HIRES_NOTE_TEXT = "Hires. fix is off: AccDiffusion only acts on the hires pass."


# --- single values -------------------------------------------------------------------------------

def coerce_value(field: Field, value: Any) -> Any:
    """``value`` validated and converted to ``field``'s type, or SettingsError with the field's
    message. Checked alone (other settings at their defaults, so no cross-field rule applies)."""
    return getattr(AccDiffusionSettings.from_dict({field.name: value}), field.name)


def parse_bool(text: Any) -> bool:
    """"True"/"False" (any case), real bools and 0/1; what an XYZ boolean axis receives."""
    return coerce_value(FIELD_BY_NAME["enabled"], text)


# --- settings for one job ------------------------------------------------------------------------

def apply_overrides(settings: AccDiffusionSettings,
                    overrides: Mapping[str, Any] | None) -> AccDiffusionSettings:
    if not overrides:
        return settings
    unknown = sorted(set(overrides) - set(FIELD_BY_NAME))
    if unknown:
        raise SettingsError(f"AccDiffusion: unknown override(s) {', '.join(map(repr, unknown))}")
    return settings.replace(**dict(overrides))


def job_settings(args: Sequence[Any], overrides: Mapping[str, Any] | None) -> AccDiffusionSettings:
    """The settings of one generation: script args, then XYZ overrides. SettingsError if invalid."""
    return apply_overrides(AccDiffusionSettings.from_script_args(args), overrides)


def requested_enabled(args: Sequence[Any], overrides: Mapping[str, Any] | None) -> bool:
    """Whether the job asked for AccDiffusion at all, read leniently from args that failed
    validation: a disabled extension with an odd slider value must not stop a normal generation."""
    raw: Any = False
    args = list(args)
    if args:
        raw = args[0].get("enabled", False) if isinstance(args[0], Mapping) else args[0]
    if overrides and "enabled" in overrides:
        raw = overrides["enabled"]
    try:
        return parse_bool(raw)
    except SettingsError:
        return True  # unreadable switch: report the problem rather than silently skip


# --- UI controls ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ControlSpec:
    """How to build one Gradio control for a field."""
    name: str
    component: str  # "checkbox", "slider" or "radio"
    label: str
    value: Any
    tooltip: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None


def _float_step(field: Field) -> float:
    span = field.maximum - field.minimum
    return 0.01 if span <= 1 else 0.05 if span <= 5 else 0.1


def control_spec(field: Field) -> ControlSpec:
    base = dict(name=field.name, label=field.label, value=field.default, tooltip=field.tooltip)
    if field.kind is bool:
        return ControlSpec(component="checkbox", **base)
    if field.kind is str:
        return ControlSpec(component="radio", choices=tuple(field.choices or ()), **base)
    if field.kind is int:
        step = field.multiple_of or 1
        lo = 0 if field.zero_means else field.minimum
        return ControlSpec(component="slider", minimum=int(lo), maximum=int(field.maximum),
                           step=step, **base)
    step = _float_step(field)
    lo, hi = field.minimum, field.maximum
    if field.exclusive:
        lo, hi = lo + step, hi - step
    return ControlSpec(component="slider", minimum=round(lo, 6), maximum=round(hi, 6), step=step,
                       **base)


def everyday_fields() -> list[Field]:
    """Shown in the accordion itself (``enabled`` is the accordion's own checkbox)."""
    return [f for f in FIELDS if f.everyday and f.name != "enabled"]


def advanced_fields() -> list[Field]:
    return [f for f in FIELDS if not f.everyday and f.name != "enabled"]


def hires_note_html(accordion_id: str) -> str:
    """Hidden by default; javascript/accdiffusion.js shows it while AccDiffusion is on and Hires.
    fix is off. ``data-accordion`` tells the script which accordion is ours."""
    return (f'<div id="{HIRES_NOTE_ID}" class="accdiffusion-hires-note" '
            f'data-accordion="{accordion_id}" style="display:none">{HIRES_NOTE_TEXT}</div>')


# --- infotext -------------------------------------------------------------------------------------

def paste_reader(field: Field) -> Callable[[Mapping[str, Any]], Any]:
    """The callable of a PasteField: a real typed value from parsed infotext params (the WebUI's own
    conversion would turn "False" into True). Absent key: what absence means (the infotext only
    lists settings that differ from it): the default, or for a field added later the old behaviour
    (:meth:`Field.absent_value`: only where AccDiffusion made the image and the setting mattered).
    Unreadable value: None, which leaves the control alone."""
    key = infotext_key(field)

    def read(params: Mapping[str, Any]) -> Any:
        if key not in params:
            return field.absent_value(params)
        try:
            return coerce_value(field, params[key])
        except SettingsError:
            return None

    read.__name__ = f"accdiffusion_paste_{field.name}"
    return read


def paste_field_names() -> list[str]:
    return [infotext_key(f) for f in FIELDS]


def settings_from_pasted(params: Mapping[str, Any]) -> AccDiffusionSettings:
    """What pasting ``params`` would put into the controls, as settings (for tests and tools)."""
    return AccDiffusionSettings(**{f.name: paste_reader(f)(params) for f in FIELDS})


# --- X/Y/Z plot -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AxisSpec:
    """Plain data for one ``xyz_grid.AxisOption``."""
    name: str
    label: str
    type: Callable[[Any], Any]
    apply: Callable[[Any, Any, Any], None]
    confirm: Callable[[Any, Sequence[Any]], None]
    choices: Callable[[], list[str]] | None = None


def axis_label(field: Field) -> str:
    """"AccDiffusion" for the switch (the infotext key too), else "AccDiffusion <label>"."""
    return INFOTEXT_PREFIX if field.name == "enabled" else f"{INFOTEXT_PREFIX} {field.label}"


def make_axis_apply(field: Field) -> Callable[[Any, Any, Any], None]:
    def apply(p: Any, x: Any, xs: Any) -> None:
        try:
            value = coerce_value(field, x)
        except SettingsError:
            value = x  # process() reports it through fail_job
        overrides = dict(getattr(p, OVERRIDES_ATTR, None) or {})  # p is shallow-copied per cell
        overrides[field.name] = value
        if field.name != "enabled":
            overrides.setdefault("enabled", True)  # an axis over c works without ticking the box
        setattr(p, OVERRIDES_ATTR, overrides)

    apply.__name__ = f"accdiffusion_apply_{field.name}"
    return apply


def make_axis_confirm(field: Field) -> Callable[[Any, Sequence[Any]], None]:
    def confirm(p: Any, xs: Sequence[Any]) -> None:
        for x in xs:
            try:
                coerce_value(field, x)
            except SettingsError as e:
                raise ValueError(str(e)) from None

    confirm.__name__ = f"accdiffusion_confirm_{field.name}"
    return confirm


def _choices(values: Sequence[str]) -> Callable[[], list[str]]:
    return lambda: list(values)


def xyz_axis_specs() -> list[AxisSpec]:
    specs = []
    for field in FIELDS:
        if not field.xyz:
            continue
        if field.kind is bool:  # like xyz_grid's own boolean axes: strings from a dropdown
            typ, choices = str, _choices(["True", "False"])
        elif field.kind is str:
            typ, choices = str, _choices(field.choices or ())
        else:  # exactly int/float, so xyz_grid expands ranges like "16-64 (+16)"
            typ, choices = field.kind, None
        specs.append(AxisSpec(field.name, axis_label(field), typ, make_axis_apply(field),
                              make_axis_confirm(field), choices))
    return specs


# --- API ------------------------------------------------------------------------------------------

def settings_schema() -> dict[str, Any]:
    """Body of ``GET /accdiffusion/v1/settings``."""
    return json_schema()
