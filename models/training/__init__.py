"""Training support: procedural synthetic scenes with exact ground truth
(:mod:`models.training.scenes`), dataset readers, train loops and evaluation.

Nothing here is imported by the pipeline at start-up; the synthetic video
source imports :mod:`models.training.scenes` (numpy only) when it is used.
"""
