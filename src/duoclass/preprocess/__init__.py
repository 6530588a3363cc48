"""Preprocessing without torch: raw images and texts become numpy arrays any backend runs; n-gram vocabularies.

May import: duoclass.errors, duoclass.data.
"""
