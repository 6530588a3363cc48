"""Report: metric functions on labels and probabilities, and the PNG plots of a run.

May import: duoclass.errors, duoclass.artifacts.
"""
