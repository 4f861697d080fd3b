"""The method: AccDiffusion's maps, masks and tile prompts, and DemoFusion's progressive tiled pass.

Pure functions and small state holders over tensors (torch, numpy, OpenCV, PIL). Imports nothing
of the package outside this folder and nothing of the WebUI (``modules``, ``backend``, ``ldm``,
``k_diffusion``, ``gradio``), so every piece runs and is tested without a host.
"""
