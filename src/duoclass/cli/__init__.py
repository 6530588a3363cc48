"""The duoclass command: thin shells over the Python API, and the Quick-start demo.

May import: anything in duoclass.
"""
