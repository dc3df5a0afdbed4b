#!/usr/bin/env bash
# e2e against PipelineWall on GPUs: `serve` under torchrun with dummy Wan2.2-I2V-A14B weights,
# then real HTTP requests from benchmarks/serve_client.py, then SIGTERM.
# Usage (device, repo root, wheels on PYTHONPATH): benchmarks/run_serve_e2e.sh NPROC OUTDIR
set -euo pipefail
nproc=${1:-2}; out=${2:-/tmp/serve_e2e}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s.%N)
setsid torchrun --standalone --nproc-per-node "$nproc" -m wan_spmd serve --model wan2.2-i2v-a14b \
  --load-format dummy --port 8765 --output-dir "$out/videos" > "$out/server.log" 2>&1 &
pid=$!
until python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8765/health').status_code != 200)" 2>/dev/null; do
  kill -0 $pid 2>/dev/null || { tail -30 "$out/server.log"; exit 1; }
  sleep 1
done
echo "{\"ready_s\": $(python3 -c "import time; print(round(time.time() - $start, 1))")}"
python3 benchmarks/serve_client.py http://127.0.0.1:8765 --size 832x480 --num-frames 81 --steps 4 --repeats 2
python3 benchmarks/serve_client.py http://127.0.0.1:8765 --size 1280x720 --num-frames 81 --steps 4
kill -TERM -- -$pid
rc=0; wait $pid || rc=$?; echo "torchrun exit: $rc"
grep -E "request|stopped|ready" "$out/server.log" | tail -8
