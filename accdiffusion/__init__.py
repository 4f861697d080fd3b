"""AccDiffusion for the Stable Diffusion WebUI (AUTOMATIC1111 1.10 and Forge 2).

The folders are the layers; each may import only the layers listed before it
(``tests/test_layout.py`` enforces this):

``method/``    the paper's method as functions over tensors: settings, attention recording, words,
               masks and tile prompts, windows, dilated sampling, the stage denoiser. torch, numpy,
               OpenCV and PIL only; nothing of the WebUI.
``flows/``     the host-neutral WebUI job and its flows (txt2img hires fix and the Upscale button,
               img2img), the conditioning rows of a CFG call, and ``webui`` — the one module that
               calls ``modules.*`` (lazily).
``backends/``  one module per host (``a1111``, ``forge``): the hooks into that host's sampler and
               UNet. A backend never imports another backend or the flows that drive it.
``entry/``     what ``scripts/accdiffusion.py`` calls: ``surfaces`` (UI, API, infotext and X/Y/Z
               specs, host-free) and ``facade`` (starts a job with the right backend, or steps aside).
``lab/``       development only — the reference host, the benchmark, the toy model. The WebUI
               never loads it and nothing above imports it.
"""

__version__ = "0.1.0"
