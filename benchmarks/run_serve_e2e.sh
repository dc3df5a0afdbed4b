#!/usr/bin/env bash
# Whole requests through the real `serve` path on GPUs: dummy Wan2.2-I2V-A14B weights, compiled
# blocks (the CUDA default), fp32 VAE, warm-up of both cases' shapes before ready; then an HTTP
# client on the same host: each case's first request after warm-up and a warm one on the raw
# /v1/videos/sync endpoint, then one on the JSON/base64 /v1/videos beside it (the server runs with
# --sync-videos, which makes that answer synchronous); then SIGTERM.
# Usage (device, repo root, wheels on PYTHONPATH): benchmarks/run_serve_e2e.sh NPROC OUTDIR [serve flags...]
set -euo pipefail
nproc=${1:-1}; out=${2:-/tmp/serve_e2e}; shift 2 || true
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
model=${MODEL:-wan2.2-i2v-a14b}; fmt=${LOAD_FORMAT:-dummy}
cases=${CASES:-"832x480:81:4 1280x720:81:1"}
shapes=$(for c in $cases; do IFS=: read -r s f _ <<<"$c"; printf '%sx%s,' "$s" "$f"; done)
start=$(date +%s.%N)
setsid python3 -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m wan_spmd serve \
  --model "$model" --load-format "$fmt" --port 8765 --output-dir "$out/videos" \
  --warmup-shapes "${shapes%,}" --sync-videos "$@" > "$out/server.log" 2>&1 &
pid=$!
until python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8765/health').status_code != 200)" 2>/dev/null; do
  kill -0 $pid 2>/dev/null || { tail -40 "$out/server.log"; exit 1; }
  sleep 0.5
done
echo "{\"launch_to_ready_s\": $(python3 -c "import time; print(round(time.time() - $start, 1))")}" | tee "$out/ready.json"
for c in $cases; do
  IFS=: read -r size frames steps <<<"$c"
  python3 benchmarks/serve_client.py http://127.0.0.1:8765 --size "$size" --num-frames "$frames" --steps "$steps" \
    --endpoint sync --repeats 2 --label "$size-${steps}step" | tee -a "$out/client.jsonl"
  python3 benchmarks/serve_client.py http://127.0.0.1:8765 --size "$size" --num-frames "$frames" --steps "$steps" \
    --endpoint json --label "$size-${steps}step" | tee -a "$out/client.jsonl"
done
kill -TERM -- -$pid
rc=0; wait $pid || rc=$?; echo "torchrun exit: $rc"
grep -E "loaded|warmed|ready|request|compil|stopped" "$out/server.log" | tail -20
