"""Training: the one loop (fit), its steps (standard, adversarial), batch sources, optimizers, data preparation
for images and text, distributed runs, the one wiring of settings + data + step + fit, tune and pretrain.

May import: duoclass.errors, artifacts, report, calibrate, settings, data, preprocess, models, robust, infer.
"""
