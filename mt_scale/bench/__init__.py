"""mt-bench: each stage of the system timed beside the alternative a user would otherwise run.

One module per stage (pack, pipeline, train with end_to_end, ema), on a CPU or a GPU; the inputs in
`inputs`, the baselines in `baselines`, the object-storage source in `s3`; the registry of stages,
the targets and the report in `runner`. The command line (mt_scale.cli) reads each stage's options
dataclass.
"""
