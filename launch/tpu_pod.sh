#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it (or reuse it), install on every worker, run on every
# worker, stream the logs.
#
#   launch/tpu_pod.sh --name=udi-v4-64 --zone=us-central2-b --accelerator-type=v4-64 \
#       --repo=GIT_URL --config=configs/vits16.py --workdir=gs://BUCKET/runs/vits16 [--dry-run]
#
# --repo is where the workers clone this project from (or set UDI_REPO).
# --workdir must be a GCS path (every worker writes its shards of each checkpoint there).
# --dry-run prints every gcloud command without running it. Anything after `--` goes to udi_jax.main.
set -euo pipefail

NAME=""
ZONE=""
ACCELERATOR=""
VERSION=${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}
CONFIG=configs/vits16.py
WORKDIR=""
REPO=${UDI_REPO:-}
JAX_VERSION=${JAX_VERSION:-0.10.2}
DRY_RUN=0
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "launch/tpu_pod.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

require() { if [[ -z "$2" ]]; then echo "launch/tpu_pod.sh: $1=... is required (see --help)." >&2; exit 2; fi; }
require --name "$NAME"
require --zone "$ZONE"
require --accelerator-type "$ACCELERATOR"
require --workdir "$WORKDIR"
require --repo "$REPO"
if [[ "$WORKDIR" != gs://* ]]; then
  echo "launch/tpu_pod.sh: --workdir must be a gs:// path that every worker can write." >&2
  exit 2
fi

run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

ssh_all() { run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$1"; }

# 1. Create the slice unless it exists.
if [[ $DRY_RUN -eq 1 ]] || ! gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION"
fi

# 2. Install on every worker.
ssh_all "set -e; if [ ! -d udi_jax ]; then git clone ${REPO} udi_jax; fi; cd udi_jax && git pull --ff-only; \
python3 -m pip install -r requirements.txt && python3 -m pip install -U 'jax[tpu]==${JAX_VERSION}' && \
python3 -m pip install -e ."

# 3. Run on every worker (jax.distributed.initialize() finds the pod by itself); logs stream back.
EXTRA_ARGS=""
if [[ ${#EXTRA[@]} -gt 0 ]]; then printf -v EXTRA_ARGS ' %q' "${EXTRA[@]}"; fi
ssh_all "cd udi_jax && python3 -m udi_jax.main --config=${CONFIG} --workdir=${WORKDIR} --distributed${EXTRA_ARGS} 2>&1 | tee -a ~/udi_jax_train.log"
