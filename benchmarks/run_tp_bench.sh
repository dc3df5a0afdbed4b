#!/usr/bin/env bash
# The TP benchmark in one device call on a 2-GPU machine: TP=1 on one GPU, then TP=2 (with its
# sequence regions), eager and compiled, then the relative L2 of each against TP=1.
# Usage (on the device, from the repo root, wheels unpacked on PYTHONPATH): benchmarks/run_tp_bench.sh OUTDIR
set -euo pipefail
out=${1:-/tmp/tp_bench}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
run() {
  local n=$1; shift
  LAUNCH_T0=$(date +%s.%N) torchrun --standalone --nproc-per-node "$n" benchmarks/tp_bench.py --out "$out" "$@"
}
CUDA_VISIBLE_DEVICES=0 run 1 --variant tp1
run 2 --variant tp2-sp --vae
run 2 --variant tp2-compiled --compile --sizes 720p
python3 benchmarks/tp_bench.py --compare "$out" tp1 tp2-sp tp2-compiled
