"""AccDiffusion for the Stable Diffusion WebUI: the host-free engine.

Modules: settings (the argument contract), attention (map recording), words and prompts
(per-tile prompts), tiles (window grids), dilated (dilated sampling with window interaction),
schedule (cosine factors), hires (stages, the fused denoiser, decode). Nothing here imports the
WebUI; host adapters live beside it.
"""

__version__ = "0.1.0"
