"""How sure: temperature scaling (temperature.py), conformal prediction sets (conformal.py), fitting both from a
model's logits (fit.py), and the rule that turns calibrated probabilities into a label, an abstention and a set
(decide.py). Pure numpy and scipy: the predict path, training and the compress stage use it.

May import: duoclass.errors, duoclass.report.
"""
