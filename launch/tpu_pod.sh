#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM / pod slice.
# usage: launch/tpu_pod.sh TPU_NAME ZONE "COMMAND"
set -euo pipefail
name=$1 zone=$2 cmd=$3
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd ~/jaxmm && pip install -q -e . && $cmd"
