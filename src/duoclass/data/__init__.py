"""Data readers: image folders, zips and CSV manifests; cleaning and quarantine; splits."""
