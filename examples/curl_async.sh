#!/usr/bin/env bash
# Image-to-video as an asynchronous job with curl, as OpenAI's and vllm-omni's APIs work: create it
# (POST /v1/videos answers the queued job at once; `Prefer: respond-async` keeps it so on a server
# started with --sync-videos too), poll GET /v1/videos/{id} until it is completed or failed, then
# download its content.
# Start a server first (see curl_client.sh), then:  examples/curl_async.sh [image] [out.mp4]
# Environment: BASE_URL (default http://localhost:8000), API_KEY (when the server runs with --api-key),
# SIZE (default: the model's own, from the image's aspect) and NUM_INFERENCE_STEPS (default: the
# model's), PROMPT, SEED. It first asks GET /v1/models what the model takes. Needs curl and jq.
set -euo pipefail

IMAGE=${1:-$(dirname "$0")/example.png}
OUT=${2:-out.mp4}
BASE_URL=${BASE_URL:-http://localhost:8000}
SIZE=${SIZE:-}
NUM_INFERENCE_STEPS=${NUM_INFERENCE_STEPS:-}
PROMPT=${PROMPT:-"A cat in a small boat drifts across a calm lake at sunrise, gentle ripples, cinematic"}
SEED=${SEED:-42}

curl_args=(-sS --fail-with-body)
[ -n "${API_KEY:-}" ] && curl_args+=(-H "Authorization: Bearer ${API_KEY}")

# What the served model takes (its size and frame limits, where the server gives them)
curl "${curl_args[@]}" "${BASE_URL}/v1/models" \
  | jq -r '.data[0] | "model \(.id): up to \(.max_width // "?")x\(.max_height // "?"), \(.max_frames // "?") frames"'
fields=()  # sent only when given: otherwise the model's defaults apply
[ -n "${SIZE}" ] && fields+=(-F "size=${SIZE}")
[ -n "${NUM_INFERENCE_STEPS}" ] && fields+=(-F "num_inference_steps=${NUM_INFERENCE_STEPS}")

id=$(curl "${curl_args[@]}" -X POST "${BASE_URL}/v1/videos" \
  -H "Prefer: respond-async" \
  -F "prompt=${PROMPT}" \
  -F "input_reference=@${IMAGE}" \
  -F "seconds=5" \
  -F "fps=16" \
  "${fields[@]}" \
  -F "seed=${SEED}" | jq -r .id)
echo "created ${id}"

while true; do
  video=$(curl "${curl_args[@]}" "${BASE_URL}/v1/videos/${id}")
  status=$(jq -r .status <<<"${video}")
  echo "${status} $(jq -r .progress <<<"${video}")%"
  case "${status}" in
    completed) break ;;
    failed) jq -r '.error.code + ": " + .error.message' <<<"${video}" >&2; exit 1 ;;
  esac
  sleep 1
done

curl "${curl_args[@]}" "${BASE_URL}/v1/videos/${id}/content" -o "${OUT}"
echo "wrote ${OUT}"
