"""Tune: sweeps with Ray Tune.

The search space (`sweep`) and the Tuner whose trials each drive one Ray Train run (`tuning`).

May import: `ferdist.launch` and every stage below it.
"""
