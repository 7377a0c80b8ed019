"""``llmjp-launch``: a run config as a PBS/SLURM job script (or a local mpirun), then submitted.

``plan`` validates everything that can be checked on the submitting host (flags, walltime,
container, the config and its parallel layout at the requested world size, data paths) and
decides binds, environment and the per-rank command; ``jobscript`` renders the templates under
``launch/`` and resolves a script against a node file for ``--dry-run``. Nothing here imports
torch: the launcher runs on login nodes with only PyYAML.
"""
