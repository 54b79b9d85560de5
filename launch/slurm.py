#!/usr/bin/env python3
"""Submit one command to SLURM as a multi-process JAX job (one process per GPU, or per node with --processes per_node).

    python launch/slurm.py --job_name imagenet --nodes 2 --gpus_per_node 8 --partition gpu --time 24:00:00 \
        --cpus_per_task 12 --setup "source .venv/bin/activate" --dry-run -- \
        mnv2 train --config configs/imagenet.py --workdir /shared/workdirs/imagenet

Without --dry-run the batch script is written (default: slurm_logs/<job_name>.sbatch) and submitted with sbatch;
the job id is printed. Near the time limit the job checkpoints, stops and requeues itself; the requeued job runs
the same command, which resumes from the workdir. See docs/launch.md and `mnv2_jax.launch.slurm`.
"""

import sys

from mnv2_jax.launch.slurm import main

if __name__ == "__main__":
    sys.exit(main())
