"""Launchers of multi-process training on SLURM clusters and Cloud TPU pods (thin layers over JAX's own runtime)."""
