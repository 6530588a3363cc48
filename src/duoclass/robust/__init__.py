"""Robustness: attacks in [0, 1] pixel or embedding space, robust accuracy, character noise, certification by
randomized smoothing. Models are reached through the objects passed in, never through infer or train.

May import: duoclass.errors, artifacts, report, settings, data, preprocess, models.
"""
