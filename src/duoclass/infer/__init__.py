"""Inference: the one predict path (preprocess -> backend -> postprocess), the torch and ONNX Runtime backends,
the Classifier, the prediction CSV and batch prediction on Ray.

May import: duoclass.errors, artifacts, report, settings, data, preprocess, models, robust.
"""
