"""Inference: the one predict path (preprocess -> backend -> postprocess), the torch and ONNX Runtime backends,
the Classifier, the prediction CSV and batch prediction on Ray.

May import: duoclass.errors, artifacts, report, calibrate, settings, data, preprocess, models, robust.
"""
