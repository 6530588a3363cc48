"""Inference: the one predict path (preprocess -> backend -> postprocess), the torch and ONNX Runtime backends,
the Classifier, the prediction CSV, batch prediction on Ray, and the explain path (infer.explain).

May import: duoclass.errors, artifacts, report, calibrate, settings, data, preprocess, models, robust, explain.
"""
