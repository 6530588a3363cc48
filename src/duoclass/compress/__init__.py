"""Compression and export: ONNX export with parity, int8 quantization, structured pruning, transformers folders.

May import: duoclass.errors, artifacts, report, calibrate, settings, data, preprocess, models, robust, infer, training.
"""
