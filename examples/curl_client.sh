#!/usr/bin/env bash
# Image-to-video with curl, in vllm-omni's documented style: a multipart POST to /v1/videos that asks
# for JSON, the mp4 pulled out of data[0].b64_json. Start a server first, e.g.
#   torchrun --nproc-per-node 2 -m wan_spmd serve --port 8000    # the tiny model; or --model DIR
# then:  examples/curl_client.sh [image] [out.mp4]
# Environment: BASE_URL (default http://localhost:8000), UDS (a Unix socket path instead of TCP),
# API_KEY (when the server runs with --api-key), SIZE (default: the model's own, from the image's aspect)
# and NUM_INFERENCE_STEPS (default: the model's), PROMPT, SEED. It first asks GET /v1/models what the
# model takes. Needs curl, jq and base64.
set -euo pipefail

IMAGE=${1:-$(dirname "$0")/example.png}
OUT=${2:-out.mp4}
BASE_URL=${BASE_URL:-http://localhost:8000}
SIZE=${SIZE:-}
NUM_INFERENCE_STEPS=${NUM_INFERENCE_STEPS:-}
PROMPT=${PROMPT:-"A cat in a small boat drifts across a calm lake at sunrise, gentle ripples, cinematic"}
SEED=${SEED:-42}

curl_args=(-sS --fail-with-body)
[ -n "${UDS:-}" ] && curl_args+=(--unix-socket "$UDS")
[ -n "${API_KEY:-}" ] && curl_args+=(-H "Authorization: Bearer ${API_KEY}")

# What the served model takes (its size and frame limits, where the server gives them)
curl "${curl_args[@]}" "${BASE_URL}/v1/models" \
  | jq -r '.data[0] | "model \(.id): up to \(.max_width // "?")x\(.max_height // "?"), \(.max_frames // "?") frames"'
fields=()  # sent only when given: otherwise the model's defaults apply
[ -n "${SIZE}" ] && fields+=(-F "size=${SIZE}")
[ -n "${NUM_INFERENCE_STEPS}" ] && fields+=(-F "num_inference_steps=${NUM_INFERENCE_STEPS}")

curl "${curl_args[@]}" -X POST "${BASE_URL}/v1/videos" \
  -H "Accept: application/json" \
  -F "prompt=${PROMPT}" \
  -F "negative_prompt=blurry, low quality, static, distorted" \
  -F "input_reference=@${IMAGE}" \
  -F "seconds=5" \
  -F "fps=16" \
  "${fields[@]}" \
  -F "guidance_scale=3.5" \
  -F "guidance_scale_2=3.5" \
  -F "boundary_ratio=0.9" \
  -F "flow_shift=5.0" \
  -F "seed=${SEED}" \
  | jq -r '.data[0].b64_json' | base64 -d > "${OUT}"

echo "wrote ${OUT}"
