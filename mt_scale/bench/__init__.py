"""mt-bench: each stage of the system timed beside the alternative a user would otherwise run.

One module per stage (pack, pipeline, train, ema), the baselines in `baselines`, the registry of
stages in `runner.STAGES`; the command line (mt_scale.cli) reads each stage's options dataclass.
"""
