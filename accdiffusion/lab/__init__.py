"""The development lab: never loaded by the WebUI, never imported by the product.

``reference`` is a minimal host (ldm UNet + k-diffusion or built-in samplers) for tests and
measurements, ``bench`` the benchmark (``python -m accdiffusion.lab.bench``), ``toy`` a tiny
text-to-image model trained on synthetic scenes that shows the method's effect
(``python -m accdiffusion.lab.toy``). May import every layer of the product.
"""
