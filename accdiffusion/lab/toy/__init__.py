"""A tiny text-to-image model trained on synthetic scenes, and the measurement of AccDiffusion on
it: ``python -m accdiffusion.lab.toy train | eval | demo``."""
