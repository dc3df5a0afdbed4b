#!/usr/bin/env bash
# Image-to-video with one curl call that waits for the video. Start a server first, e.g.
#   torchrun --nproc-per-node 2 -m wan_spmd serve --port 8000    # the tiny model; or --model DIR
# then:  examples/curl_client.sh [image] [out.mp4]
# By default it posts to /v1/videos/sync, which answers the raw mp4 on any server. With B64=1 it is
# vllm-omni's earlier style instead: a multipart POST to /v1/videos that asks for JSON, the mp4 pulled
# out of data[0].b64_json; that answer needs a server started with --sync-videos (without it,
# POST /v1/videos answers a queued job at once: see curl_async.sh).
# Environment: BASE_URL (default http://localhost:8000), UDS (a Unix socket path instead of TCP),
# API_KEY (when the server runs with --api-key), SIZE (default: the model's own, from the image's aspect)
# and NUM_INFERENCE_STEPS (default: the model's), PROMPT, SEED. It first asks GET /v1/models what the
# model takes. Needs curl and jq (and base64 for B64=1).
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
fields=(  # size and steps sent only when given: otherwise the model's defaults apply
  -F "prompt=${PROMPT}"
  -F "negative_prompt=blurry, low quality, static, distorted"
  -F "input_reference=@${IMAGE}"
  -F "seconds=5"
  -F "fps=16"
  -F "seed=${SEED}"
)
[ -n "${SIZE}" ] && fields+=(-F "size=${SIZE}")
[ -n "${NUM_INFERENCE_STEPS}" ] && fields+=(-F "num_inference_steps=${NUM_INFERENCE_STEPS}")

if [ -n "${B64:-}" ]; then
  curl "${curl_args[@]}" -X POST "${BASE_URL}/v1/videos" -H "Accept: application/json" "${fields[@]}" \
    | jq -r '.data[0].b64_json' | base64 -d > "${OUT}"
else
  curl "${curl_args[@]}" -X POST "${BASE_URL}/v1/videos/sync" "${fields[@]}" -o "${OUT}"
fi

echo "wrote ${OUT}"
