"""Explanation methods: occlusion (any backend, numpy only), Grad-CAM and integrated gradients (torch models),
their rendering as PNG overlays, HTML pages and grids, and the checks that they are not noise. The one explain
path over inputs (infer.explain) calls them.

May import: duoclass.errors, artifacts, preprocess, models.
"""
