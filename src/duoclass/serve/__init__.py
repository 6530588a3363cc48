"""Serving: settings, request parsing and limits, auth, micro-batching, metrics, model cards, the FastAPI app and its page.

May import: duoclass.errors, artifacts, report, calibrate, settings, data, preprocess, models, infer, explain.
"""
