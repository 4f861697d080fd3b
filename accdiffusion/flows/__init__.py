"""The host-neutral WebUI job and its flows.

``job`` holds one generation's state and runs the tiled pass; ``txt2img`` replaces the hires pass
(and serves the Upscale button), ``img2img`` replaces the img2img sampling after a probe pass;
``rows`` tells which image each conditioning row of a CFG call belongs to; ``webui`` is the only
module that calls ``modules.*`` (imported lazily, so the rest is testable without a WebUI).
May import ``method``; never a backend, ``entry`` or ``lab``.
"""
