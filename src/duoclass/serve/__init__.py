"""Serving: settings, request parsing and limits, auth, micro-batching, metrics, model cards, the FastAPI app and its page.

May import: duoclass.errors, artifacts, report, settings, data, preprocess, models, infer.
"""
