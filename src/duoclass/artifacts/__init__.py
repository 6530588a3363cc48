"""Artifacts: atomic writes and the one folder replace, the model-folder schema (config.json, hashes, variants), training state.

May import: duoclass.errors (and the package version).
"""
