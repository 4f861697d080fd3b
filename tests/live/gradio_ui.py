"""Calls to a live WebUI's own Gradio event handlers (what its buttons do), built from GET /config.

Some WebUI features are not in the /sdapi REST API, e.g. the txt2img *Upscale* button (A1111
modules/ui.py:424-430 ``output_panel.button_upscale.click(... txt2img_upscale ...)``; Forge
modules/ui.py:479-486 the same). The browser runs them by POSTing the dependency's inputs, in
order, to Gradio; this module does the same over plain HTTP:

- ``GET /config``: ``components`` (``id``, ``type``, ``props`` with ``value`` and ``elem_id``) and
  ``dependencies`` (``targets``: component ids in Gradio 3, ``[id, event]`` pairs in Gradio 4;
  ``inputs``/``outputs``: component ids; Gradio 4 also an ``id``, Gradio 3 uses the position).
- ``POST /run/predict`` with ``{"fn_index", "data"}``: served by both Gradio 3.41 (A1111) and
  Gradio 4.40 (Forge) while the queue's ``api_open`` is true (the default; both WebUIs call
  ``demo.queue(64)``). The dependency's ``js`` (e.g. ``submit_txt2img_upscale``) runs in the browser
  only: it supplies the task id and the selected gallery index, which the caller passes here.

Inputs start from each component's default value in the config; the caller overrides them by
``elem_id`` (or by slot for components without one, such as the hidden dummy components).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Mapping


class GradioCallError(RuntimeError):
    pass


def http(url: str, body: Any = None, timeout: float = 600) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise GradioCallError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None
    return json.loads(raw)


@dataclass
class Event:
    """One dependency (event handler) of the UI: what to POST and how to read the answer."""
    fn_index: int
    inputs: list[dict[str, Any]]  # the input components, in order
    outputs: list[dict[str, Any]]
    js: str | None


class GradioUI:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.config = http(self.url + "/config")
        self.components = {c["id"]: c for c in self.config["components"]}
        self.gradio4 = str(self.config.get("version", "3")).split(".")[0] >= "4"

    def elem_id(self, component_id: int) -> str | None:
        return self.components.get(component_id, {}).get("props", {}).get("elem_id")

    def event(self, target_elem_id: str, js: str | None = None) -> Event:
        """The dependency a click on the component ``target_elem_id`` triggers first (``js``
        narrows it down when several do, e.g. a ``.then`` chain)."""
        for position, dep in enumerate(self.config["dependencies"]):
            targets = [t[0] if isinstance(t, (list, tuple)) else t for t in dep.get("targets", [])]
            if not any(self.elem_id(t) == target_elem_id for t in targets):
                continue
            if js is not None and dep.get("js") != js:
                continue
            return Event(fn_index=dep.get("id", position) if self.gradio4 else position,
                         inputs=[self.components[i] for i in dep["inputs"]],
                         outputs=[self.components[i] for i in dep["outputs"]], js=dep.get("js"))
        raise GradioCallError(f"no event handler on elem_id {target_elem_id!r} (js {js!r}) in {self.url}/config")

    @staticmethod
    def default_value(component: Mapping[str, Any]) -> Any:
        props = component.get("props", {})
        value = props.get("value")
        if component.get("type") == "dropdown" and props.get("multiselect") and value is None:
            return []  # what the browser sends for an empty multiselect
        if component.get("type") == "textbox" and value is None:
            return ""  # what the browser sends for an empty textbox (Forge's hires prompts default to None)
        if component.get("type") == "label":
            return None  # the WebUIs' hidden dummy components
        return value

    def inputs(self, event: Event, by_elem_id: Mapping[str, Any], by_slot: Mapping[int, Any] | None = None,
               optional: Mapping[str, Any] | None = None) -> list[Any]:
        """The ``data`` list: defaults, then ``by_elem_id`` (each must exist: a typo or a renamed
        control fails loudly), ``optional`` (applied where the UI has the control, e.g. an
        extension's controls on a host that may lack the extension), then ``by_slot``."""
        data = [self.default_value(c) for c in event.inputs]
        ids = [c.get("props", {}).get("elem_id") for c in event.inputs]
        missing = sorted(set(by_elem_id) - set(ids))
        if missing:
            raise GradioCallError(f"inputs not found by elem_id: {missing}")
        for values in (by_elem_id, optional or {}):
            for slot, elem_id in enumerate(ids):
                if elem_id in values:
                    data[slot] = values[elem_id]
        for slot, value in (by_slot or {}).items():
            data[slot] = value
        return data

    def call(self, event: Event, data: list[Any], timeout: float = 600) -> dict[str, Any]:
        """POST the event; the outputs by elem_id (and by position under ``"_list"``)."""
        out = http(self.url + "/run/predict", {"fn_index": event.fn_index, "data": data}, timeout)
        if "data" not in out:
            raise GradioCallError(f"no data in the answer: {str(out)[:2000]}")
        # an output the handler answered with gr.update(value=..., visible=...) (Forge Neo's txt2img
        # gallery) comes as {"__type__": "update", "value": ...}: its value is what an input takes
        values = [v["value"] if isinstance(v, dict) and "value" in v and (v.get("__type__") == "update"
                                                                         or "visible" in v) else v
                  for v in out["data"]]
        named: dict[str, Any] = {"_list": values}
        for component, value in zip(event.outputs, values):
            elem_id = component.get("props", {}).get("elem_id")
            if elem_id:
                named[elem_id] = value
        return named

    def file_url(self, entry: Any) -> str:
        """The URL of one gallery entry of an output (Gradio 3: ``[{"name", "is_file"}, caption]`` or
        the dict alone; Gradio 4: ``{"image": {"path", "url"}, "caption"}``)."""
        if isinstance(entry, (list, tuple)):
            entry = entry[0]
        if isinstance(entry, dict) and "image" in entry:
            entry = entry["image"]
        if isinstance(entry, dict):
            if entry.get("url"):
                return entry["url"] if "://" in entry["url"] else self.url + entry["url"]
            path = entry.get("path") or entry.get("name")
        else:
            path = entry
        path = str(path).split("?", 1)[0]  # A1111 appends "?<mtime>" to saved files' names
        return f"{self.url}/file={urllib.parse.quote(path)}"

    def image(self, entry: Any) -> Any:
        from PIL import Image
        import io

        with urllib.request.urlopen(self.file_url(entry), timeout=60) as r:
            return Image.open(io.BytesIO(r.read())).copy()
