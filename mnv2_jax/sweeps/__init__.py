"""Config sweeps: sweep files, their runs on a local machine, SLURM or a TPU pod, and the report."""
