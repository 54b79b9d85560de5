#!/usr/bin/env python3
"""Create a Cloud TPU pod, install this checkout on every worker, run a command on all of them (gcloud).

    python launch/tpu.py create --name mnv2-pod --zone us-central2-b --accelerator_type v4-32 --spot
    python launch/tpu.py setup  --name mnv2-pod --zone us-central2-b
    python launch/tpu.py run    --name mnv2-pod --zone us-central2-b -- \
        mnv2 train --config configs/imagenet.py --workdir gs://my-bucket/workdirs/imagenet
    python launch/tpu.py logs   --name mnv2-pod --zone us-central2-b --job imagenet --workers 4
    python launch/tpu.py delete --name mnv2-pod --zone us-central2-b

--dry-run prints the gcloud commands instead of running them. After a preemption: create, setup and the same run
command again; training resumes from the gs:// workdir. See docs/launch.md and `mnv2_jax.launch.tpu`.
"""

import sys

from mnv2_jax.launch.tpu import main

if __name__ == "__main__":
    sys.exit(main())
