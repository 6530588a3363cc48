"""Data readers: image folders, zips and CSV manifests; cleaning and quarantine; splits; text files.

May import: duoclass.errors, duoclass.artifacts, duoclass.settings.
"""
