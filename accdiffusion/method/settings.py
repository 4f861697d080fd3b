"""The one validated model of every AccDiffusion argument.

UI, API, infotext and XYZ all read the table in ``FIELDS``: names, defaults, ranges, labels and
tooltips live here and nowhere else. No third-party dependency (pydantic differs between A1111,
which pins v1, and Forge, which ships v2), so the model is a frozen dataclass plus a field table.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

INFOTEXT_PREFIX = "AccDiffusion"
# The infotext key of a job AccDiffusion was enabled for but did not run (the WebUI's own pass
# ran): its value says why and what ran. Not a setting, so pasting it leaves AccDiffusion off.
STEP_ASIDE_KEY = f"{INFOTEXT_PREFIX} stepped aside"


class SettingsError(ValueError):
    """A bad AccDiffusion argument; the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class Field:
    name: str
    kind: type  # bool, float, int or str
    default: Any
    label: str
    tooltip: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive: bool = False  # open interval (minimum, maximum)
    zero_means: str | None = None  # int fields where 0 is a special "automatic" value
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    everyday: bool = False  # shown outside the "Advanced" group
    xyz: bool = False  # offered as an X/Y/Z plot axis
    # What an infotext without this field's key stands for, where that is not the default: the
    # behaviour before the field existed, so that images made then replay exactly. None: the default.
    infotext_absent: Any = None
    # (field, value): the setting only matters, and is only written, while that field has that value
    recorded_with: tuple[str, str] | None = None

    def recorded(self, values: Mapping[str, Any]) -> bool:
        """Whether this setting matters for (and is written into the infotext of) a job with these
        settings, by field name."""
        return self.recorded_with is None or values[self.recorded_with[0]] == self.recorded_with[1]

    def absent_value(self, params: Mapping[str, Any]) -> Any:
        """The value a pasted infotext without this field's key gives: the default, or, for an
        image AccDiffusion made where the setting mattered, the behaviour before the field
        existed (:attr:`infotext_absent`). An image of another job has nothing to replay."""
        if self.infotext_absent is None or INFOTEXT_PREFIX not in params:
            return self.default
        if self.recorded_with is not None:
            other = FIELD_BY_NAME[self.recorded_with[0]]
            try:
                value = _coerce(other, params.get(infotext_key(other), other.absent_value(params)))
            except SettingsError:
                return self.default
            if value != self.recorded_with[1]:
                return self.default
        return self.infotext_absent

    def allowed(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        lo, hi = _fmt(self.minimum), _fmt(self.maximum)
        span = f"({lo}, {hi})" if self.exclusive else f"[{lo}, {hi}]"
        text = f"{'an integer' if self.kind is int else 'a number'} in {span}"
        if self.multiple_of:
            text += f", a multiple of {self.multiple_of}"
        if self.zero_means:
            text = f"0 ({self.zero_means}) or " + text
        return text


def _fmt(v: float | None) -> str:
    return "-inf" if v is None else (str(int(v)) if float(v).is_integer() else str(v))


FIELDS: tuple[Field, ...] = (
    Field("enabled", bool, False, "Enable AccDiffusion",
          "Replace Hires. fix with the AccDiffusion pass: per-tile prompts from the first pass's "
          "attention, progressive upscaling and dilated sampling. Needs Hires. fix on.",
          xyz=True),
    Field("patch_prompts", bool, True, "Patch prompts",
          "Give every tile only the words whose attention covers it, so a tile without a face is "
          "not asked for a face. This is what stops duplicated objects; turn off to compare.",
          everyday=True, xyz=True),
    Field("patch_prompt_threshold", float, 0.3, "Patch prompt threshold",
          "c: a word goes into a tile's prompt when its mask covers more than this share of the "
          "tile. Raise it if duplicates remain, lower it if tiles lose detail.",
          minimum=0.0, maximum=1.0, exclusive=True, everyday=True, xyz=True),
    Field("dilated_sampling", bool, True, "Dilated sampling",
          "Also denoise interleaved sub-images of the whole latent, which carries global structure "
          "into the tiles. Turn off only to save time on small upscales.",
          everyday=True, xyz=True),
    Field("window_interaction", bool, True, "Window interaction",
          "Shuffle the dilated sub-images position-wise before each step (and back after), which "
          "removes the grainy look of plain dilated sampling.",
          everyday=True, xyz=True),
    Field("skip_residual", bool, True, "Skip residual",
          "Pull the early steps toward the upscaled first-pass image, re-noised. Keeps the "
          "composition; turn off only for experiments.",
          xyz=True),
    Field("cosine_scale_1", float, 3.0, "Cosine scale 1",
          "Decay of the skip residual. Lower keeps the composition of the first pass longer; "
          "higher frees detail sooner.",
          minimum=0.0, maximum=10.0, xyz=True),
    Field("cosine_scale_2", float, 1.0, "Cosine scale 2",
          "Decay of the dilated branch's share. Lower keeps more global structure; higher gives "
          "the local tiles more say.",
          minimum=0.0, maximum=10.0, xyz=True),
    Field("cosine_scale_3", float, 1.0, "Cosine scale 3",
          "Decay of the blur on the dilated branch's input. Lower blurs longer.",
          minimum=0.0, maximum=10.0, xyz=True),
    Field("sigma", float, 0.8, "Sigma",
          "Gaussian blur strength of the dilated branch's input; 0 turns the blur off. Raise it if "
          "the result is grainy, lower it if it is soft.",
          minimum=0.0, maximum=3.0, xyz=True),
    Field("window_size", int, 0, "Window size",
          "Side of the local windows in latent pixels (image pixels / 8). 0 uses the first-pass "
          "latent size, which is what the model was made for.",
          minimum=16, maximum=512, zero_means="the first-pass latent size", multiple_of=8,
          xyz=True),
    Field("stride", int, 0, "Stride",
          "Step between windows in latent pixels. 0 is half the window. Smaller hides seams "
          "better and costs more UNet calls.",
          minimum=8, maximum=512, zero_means="half the window", multiple_of=8, xyz=True),
    Field("tile_batch_size", int, 0, "Tile batch size",
          "Windows denoised per UNet call. 0 picks the most that fit in free GPU memory (4 on a "
          "CPU); set a number to fix it, lower if you run out of memory.",
          minimum=1, maximum=64, zero_means="automatic", xyz=True),
    Field("progressive", bool, True, "Progressive upscale",
          "Upscale in steps of the first-pass size (2x, 3x, ...) instead of one jump. Slower, "
          "and better past 2x."),
    Field("tiled_decode", str, "auto", "Tiled decode",
          "Decode the final latent in tiles so large images fit in memory. auto: only when large.",
          choices=("auto", "on", "off")),
    Field("tile_prompt_map", bool, False, "Tile prompt map",
          "Also return a picture of the first-pass image with the last stage's tiles and the words "
          "each tile got: it shows why a duplicate did or did not appear."),
    # The default became shifted (1-px grain) after measuring both toys (docs/speed.md); an
    # infotext without the key is an image of the overlap days.
    Field("window_mode", str, "shifted", "Window mode",
          "shifted: s^2 windows that tile the image without overlap, moved by a random offset every "
          "step so no seam stays: about half the UNet work, as good as overlap on the toy models. "
          "overlap: windows overlap by half and are averaged, (2s-1)^2 per step at s times the "
          "first-pass size (the paper's).",
          choices=("overlap", "shifted"), xyz=True, infotext_absent="overlap"),
    Field("prompt_units", str, "phrases", "Prompt units",
          "What a tile prompt keeps or drops as one: phrases (the words between commas, BREAK, "
          "periods, 'and', 'with', ...; one mask per phrase, so 'red' stays with 'hair') or "
          "single words (the paper's).",
          choices=("phrases", "words"), xyz=True),
    # Added after window_mode shipped with its grid on the model's size multiple: an infotext
    # without this key is an image made with that grain (0), whatever the default is now.
    Field("window_grain", int, 1, "Window grain",
          "shifted windows only: the step, in latent pixels, of the grid's offset and cuts. 1 lets a "
          "seam fall on any latent pixel (windows padded for the model and cropped back); 0 keeps "
          "them on the model's size multiple (8 on SD, 2 on Flux, Chroma and SD 3.5), as before "
          "this setting existed.",
          minimum=1, maximum=8, zero_means="the model's size multiple", xyz=True, infotext_absent=0,
          recorded_with=("window_mode", "shifted")),
)

FIELD_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}


def _coerce(field: Field, value: Any) -> Any:
    bad = SettingsError(
        f"AccDiffusion: invalid value {value!r} for '{field.name}': expected {field.allowed()}")
    if field.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise bad
    if field.kind is str:
        if isinstance(value, str) and value.strip().lower() in (field.choices or ()):
            return value.strip().lower()
        raise bad
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise bad from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad
    if field.kind is int:
        if not float(value).is_integer():
            raise bad
        value = int(value)
        if field.zero_means and value == 0:
            return 0
    else:
        value = float(value)
    lo, hi = field.minimum, field.maximum
    if field.exclusive:
        if not (lo < value < hi):
            raise bad
    elif not (lo <= value <= hi):
        raise bad
    if field.multiple_of and value % field.multiple_of:
        raise bad
    return value


@dataclass(frozen=True)
class AccDiffusionSettings:
    enabled: bool = False
    patch_prompts: bool = True
    patch_prompt_threshold: float = 0.3
    dilated_sampling: bool = True
    window_interaction: bool = True
    skip_residual: bool = True
    cosine_scale_1: float = 3.0
    cosine_scale_2: float = 1.0
    cosine_scale_3: float = 1.0
    sigma: float = 0.8
    window_size: int = 0
    stride: int = 0
    tile_batch_size: int = 0
    progressive: bool = True
    tiled_decode: str = "auto"
    tile_prompt_map: bool = False
    window_mode: str = "shifted"
    prompt_units: str = "phrases"
    window_grain: int = 1

    def __post_init__(self) -> None:
        for field in FIELDS:
            object.__setattr__(self, field.name, _coerce(field, getattr(self, field.name)))
        if self.window_size and self.stride and self.stride > self.window_size:
            raise SettingsError(
                f"AccDiffusion: 'stride' ({self.stride}) must not exceed 'window_size' "
                f"({self.window_size}), or the windows would leave gaps")

    # --- construction from the outside world -------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AccDiffusionSettings":
        """Named settings (API): missing names take defaults, unknown names are rejected."""
        if not isinstance(values, Mapping):
            raise SettingsError(f"AccDiffusion: expected a dict of settings, got {type(values).__name__}")
        unknown = sorted(set(values) - set(FIELD_BY_NAME))
        if unknown:
            raise SettingsError(
                f"AccDiffusion: unknown setting(s) {', '.join(map(repr, unknown))}; valid names: "
                + "; ".join(f"{f.name} ({f.allowed()}, default {f.default!r})" for f in FIELDS))
        return cls(**dict(values))

    @classmethod
    def from_positional(cls, args: Iterable[Any]) -> "AccDiffusionSettings":
        """Values in UI order (``FIELDS`` order), as the WebUI passes script args; short lists
        take defaults for the rest."""
        args = list(args)
        if len(args) > len(FIELDS):
            raise SettingsError(
                f"AccDiffusion: got {len(args)} positional arguments, expected at most "
                f"{len(FIELDS)}: {', '.join(f.name for f in FIELDS)}")
        return cls(**{f.name: v for f, v in zip(FIELDS, args)})

    @classmethod
    def from_script_args(cls, args: Iterable[Any]) -> "AccDiffusionSettings":
        """What a script receives: either positional values, or a dict of named settings first
        (the API copies ``args`` over the UI defaults, so the defaults follow the dict and are
        ignored)."""
        args = list(args)
        if args and isinstance(args[0], Mapping):
            return cls.from_dict(args[0])
        return cls.from_positional(args)

    def replace(self, **changes: Any) -> "AccDiffusionSettings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in FIELDS}

    def to_positional(self) -> list[Any]:
        return [getattr(self, f.name) for f in FIELDS]

    # --- infotext -------------------------------------------------------------------------------
    def infotext_params(self) -> dict[str, Any]:
        """``AccDiffusion <label>`` keys for every setting that differs from its default, plus the
        switch itself. Empty when disabled, so a disabled job's infotext is untouched. A setting
        added later (:attr:`Field.infotext_absent`) is always written where it matters, since its
        absence stands for the old behaviour; one that does not matter for the job (the grain of
        overlap windows) is not written."""
        if not self.enabled:
            return {}
        params: dict[str, Any] = {INFOTEXT_PREFIX: True}
        values = self.to_dict()
        for field in FIELDS[1:]:
            value = values[field.name]
            if field.recorded(values) and (value != field.default or field.infotext_absent is not None):
                params[infotext_key(field)] = value
        return params

    @classmethod
    def from_infotext(cls, params: Mapping[str, Any]) -> "AccDiffusionSettings":
        """Inverse of :meth:`infotext_params`; absent keys take :meth:`Field.absent_value`."""
        values: dict[str, Any] = {"enabled": params.get(INFOTEXT_PREFIX, False)}
        for field in FIELDS[1:]:
            key = infotext_key(field)
            values[field.name] = params[key] if key in params else field.absent_value(params)
        return cls(**values)


def infotext_key(field: Field) -> str:
    return INFOTEXT_PREFIX if field.name == "enabled" else f"{INFOTEXT_PREFIX} {field.label.lower()}"


def json_schema() -> dict[str, Any]:
    """JSON schema of the named-settings dict the API accepts."""
    props: dict[str, Any] = {}
    for field in FIELDS:
        prop: dict[str, Any] = {"title": field.label, "description": field.tooltip,
                                "default": field.default}
        if field.kind is bool:
            prop["type"] = "boolean"
        elif field.kind is str:
            prop.update(type="string", enum=list(field.choices or ()))
        else:
            prop["type"] = "integer" if field.kind is int else "number"
            if field.exclusive:
                prop.update(exclusiveMinimum=field.minimum, exclusiveMaximum=field.maximum)
            elif field.zero_means:
                prop["anyOf"] = [{"const": 0},
                                 {"minimum": field.minimum, "maximum": field.maximum,
                                  **({"multipleOf": field.multiple_of} if field.multiple_of else {})}]
            else:
                prop.update(minimum=field.minimum, maximum=field.maximum)
        props[field.name] = prop
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "AccDiffusion settings", "type": "object", "properties": props,
            "additionalProperties": False}


if __name__ == "__main__":  # pragma: no cover - a quick look at the contract
    print(json.dumps(json_schema(), indent=2))
