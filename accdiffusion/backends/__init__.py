"""One backend per host: how a job records attention and runs a stage on that host's objects.

``a1111`` (AUTOMATIC1111 1.10: its CFG denoiser and ldm/sgm UNets) and ``forge`` (Forge 2: the
only module that touches Forge's ``backend.*``). A backend may import ``method`` and the job's
helpers in ``flows`` (``job``, ``rows``); never another backend, the flows that drive it
(``txt2img``, ``img2img``), ``entry`` or ``lab``.
"""
