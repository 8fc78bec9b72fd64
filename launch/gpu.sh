#!/usr/bin/env bash
# Train on one GPU node: one process drives all its GPUs (JAX sees them as one mesh).
#
#   launch/gpu.sh --config=configs/vits16.py --workdir=runs/vits16 [--install] [--dry-run] [-- EXTRA FLAGS]
#
# --install   installs requirements.txt, the CUDA build of JAX and this project first
# --dry-run   prints every command without running it
# Anything after `--` goes to udi_jax.main (e.g. --config.batch_size=512).
set -euo pipefail

CONFIG=configs/vits16.py
WORKDIR=""
INSTALL=0
DRY_RUN=0
PYTHON=${PYTHON:-python3}
JAX_VERSION=${JAX_VERSION:-0.10.2}
EXTRA=()

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --install) INSTALL=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "launch/gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

if [[ $INSTALL -eq 1 ]]; then
  run "$PYTHON" -m pip install -r requirements.txt
  run "$PYTHON" -m pip install -U "jax[cuda12]==${JAX_VERSION}"
  run "$PYTHON" -m pip install -e .
fi

ARGS=(-m udi_jax.main "--config=${CONFIG}")
[[ -n "$WORKDIR" ]] && ARGS+=("--workdir=${WORKDIR}")
# The JAX GPU performance guide's flag for data-parallel training: the scheduler overlaps the gradient
# all-reduce with the backward pass. Your own XLA_FLAGS come first and are kept.
GPU_XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
run env XLA_PYTHON_CLIENT_MEM_FRACTION=.95 "XLA_FLAGS=${GPU_XLA_FLAGS}" "$PYTHON" "${ARGS[@]}" "${EXTRA[@]}"
