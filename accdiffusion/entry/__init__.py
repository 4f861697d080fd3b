"""What the WebUI glue (``scripts/accdiffusion.py``) calls.

``surfaces`` builds the UI controls, API schema, infotext readers and X/Y/Z axes from the settings
(host-free, loaded when the WebUI starts); ``facade`` starts a job with the backend of the running
host or steps aside (imported when a generation starts). May import every layer but ``lab``.
"""
