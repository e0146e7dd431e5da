#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM / pod slice, after installing jaxmm (from the
# checkout at ~/jaxmm on each worker) with TPU jax at the version pyproject.toml pins.
# usage: launch/tpu_pod.sh TPU_NAME ZONE "COMMAND"
set -euo pipefail
name=$1 zone=$2 cmd=$3
jax_version=$(sed -n 's/^ *"jax==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../pyproject.toml")
[[ -n "$jax_version" ]] || { echo "no jax==X pin found in pyproject.toml" >&2; exit 1; }
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd ~/jaxmm && pip install -q -e . 'jax[tpu]==$jax_version' && $cmd"
