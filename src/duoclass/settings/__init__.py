"""Settings: the typed dataclasses every entry point fills (TrainConfig, PretrainConfig), augmentation presets,
the attack budget, and the argparse flags generated from them.

May import: duoclass.errors, duoclass.artifacts, duoclass.report.
"""
