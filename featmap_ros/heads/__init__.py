"""Pose heads, one module each: what it predicts, how its targets come from a render, how it decodes.

The BB8 corner head (the paper's) lives in datasets/streams.py (corner_targets) and the estimator
(PnP on 8 corners); the dense correspondence head in heads/dense.py.
"""
