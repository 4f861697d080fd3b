"""Every forbidden value of every AccDiffusion setting, derived from the field table (types, ranges,
open intervals, multiples, the 0 = automatic rule), plus an unknown name and the one cross-field
rule: what the unit tests (tests/test_refusals_and_infotext.py) and the live API test
(tests/live/test_live_refusals.py) send. Each case is (the setting the message must name, the
named-settings dict)."""

from __future__ import annotations

from typing import Any

from accdiffusion.method.settings import FIELDS, Field


def forbidden_values(field: Field) -> list[Any]:
    """Values ``field`` must refuse (JSON-serialisable; NaN and Infinity as Python's json writes them)."""
    wrong_types: list[Any] = ["not a value", None, [1]]
    if field.kind is bool:
        return wrong_types + [2, -1, 0.5]
    if field.kind is str:
        return wrong_types + [True, 3, (field.choices or ("",))[0] + "x"]
    out = wrong_types + [True, float("nan"), float("inf")]
    lo, hi = field.minimum, field.maximum
    step = field.multiple_of or (1 if field.kind is int else 0.5)
    out += [hi + step, -step if field.zero_means else lo - step]
    if field.exclusive:
        out += [lo, hi]
    if field.kind is int:
        out.append(lo + 0.5)  # not an integer
        if field.multiple_of:
            out.append(lo + 1)  # not a multiple
        if field.zero_means and lo > step:
            out.append(lo - step)  # between 0 and the minimum
    return out


def cases() -> list[tuple[str, dict[str, Any]]]:
    """(the setting named in the refusal, the request's settings dict), AccDiffusion enabled."""
    out: list[tuple[str, dict[str, Any]]] = []
    for field in FIELDS:
        for value in forbidden_values(field):
            settings = {field.name: value} if field.name == "enabled" else {"enabled": True, field.name: value}
            out.append((field.name, settings))
    out.append(("unknown_setting", {"enabled": True, "unknown_setting": 1}))
    out.append(("stride", {"enabled": True, "window_size": 32, "stride": 64}))  # stride above the window
    return out


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    name, settings = case
    return f"{name}={settings.get(name)!r}"
