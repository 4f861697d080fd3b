"""Run by the WebUI's launcher: installs OpenCV only when ``cv2`` is missing."""

import sys

import launch

_args = getattr(launch, "args", None)
_skip = bool(getattr(_args, "skip_install", False)) or "--skip-install" in sys.argv

if not _skip and not launch.is_installed("cv2"):
    launch.run_pip("install opencv-python", "opencv-python for AccDiffusion")
