#!/bin/bash
# jaxarch: ${description}
# Runs the training command on every worker of the TPU VM over ssh (--worker=all); each
# worker's process joins jax.distributed, which finds the others from the TPU VM's
# metadata. The TPU VM must exist and have jaxarch installed on every worker
# (launch/README.md). Rendered by `jaxarch launch --target=tpu-vm` from
# launch/tpu_vm/run.sh; run with `bash FILE`.
set -euo pipefail

gcloud compute tpus tpu-vm ssh ${name} ${gcloud_flags}--worker=all --batch-size=${nodes} \
  --command=${remote_command}
