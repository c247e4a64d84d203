"""`mt-bench gpu`: one command that proves the GPU path and measures it (issue 14).

Checks DALI's GPU pipelines (structure, eval view against the torch backend, training-view
statistics against the augmentation spec), measures the two-view DALI loader, the shipped step
(mt_scale.step) on timm resnet152 in bf16 channels-last at the preset's per-device batch and at the
largest batch that fits, with and without torch.compile, and the EMA update, then runs a 30-step
mt-train with a checkpoint and an exact resume. Writes a JSON of figures and a Markdown table.
`--dry-run` runs the same code on the CPU with tiny sizes (CI); `--wheels DIR` first joins split
wheels and installs what this Python lacks from DIR, never from the network. A bare GPU machine runs
it with its own Python and the repository root on the path (`python3 -m mt_scale.bench.gpu gpu ...`),
so every module imports torch, DALI and webdataset inside its functions only: `--install-only` runs
before they can be imported. docs/performance.md, "GPU check", explains it all.

Modules: plan (sizes, names of figures and checks, the parts' context) · report (JSON and Markdown)
· install (wheels, offline) · data (generated photos and patterns) · dali_checks and view_stats
(DALI's views against the spec) · steps (the shipped step, the largest batch, torch.compile) ·
timing (loader, EMA, end to end) · training (mt-train and its exact resume) · cli (the run, the parser).
"""
