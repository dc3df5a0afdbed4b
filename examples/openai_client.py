"""Image-to-video with the official `openai` package (pip install openai), as its docs show for
Sora: create the job, poll it until it is finished, download the mp4. Start a server first, e.g.
    torchrun --nproc-per-node 2 -m wan_spmd serve --model /path/to/Wan2.2-I2V-A14B-Diffusers --port 8000
then:  python examples/openai_client.py [image] [out.mp4]
Environment: BASE_URL (default http://localhost:8000/v1), API_KEY (when the server runs with --api-key),
SIZE (default: the image's aspect ratio within the model's area), SECONDS, NUM_INFERENCE_STEPS
(smaller for the tiny model), PROMPT, SEED.

The SDK's types list Sora's sizes and seconds only ("720x1280", ..., "4", "8", "12"): other sizes and
our own fields (num_inference_steps, seed, ...) go in `extra_body`, which the SDK sends as form fields.
`create` answers a queued job at once (as OpenAI's API does); `create_and_poll` then polls it. The
server's model card (GET /v1/models) says what sizes and frame counts the model takes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from openai import OpenAI


def main() -> int:
    image = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("example.png"))
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "out.mp4")
    client = OpenAI(
        base_url=os.environ.get("BASE_URL", "http://localhost:8000/v1"),
        api_key=os.environ.get("API_KEY", "unused"),  # the SDK insists on one; a server without --api-key ignores it
    )
    card = client.models.list().data[0]  # our card adds the model's limits to OpenAI's fields
    limits = card.model_extra or {}
    extra: dict[str, object] = {
        "num_inference_steps": int(os.environ.get("NUM_INFERENCE_STEPS", "40")),
        "seed": int(os.environ.get("SEED", "42")),
    }
    if os.environ.get("SIZE"):
        width, height = (int(n) for n in os.environ["SIZE"].lower().split("x"))
        if width > limits.get("max_width", width) or height > limits.get("max_height", height):
            print(f"{card.id} takes at most {limits['max_width']}x{limits['max_height']}", file=sys.stderr)
            return 2
        extra["size"] = os.environ["SIZE"]
    with image.open("rb") as picture:
        video = client.videos.create_and_poll(
            prompt=os.environ.get("PROMPT", "A cat in a small boat drifts across a calm lake at sunrise, cinematic"),
            input_reference=picture,
            model=card.id,
            seconds=os.environ.get("SECONDS", "4"),
            extra_body=extra,
            poll_interval_ms=1000,
        )
    if video.status != "completed":
        print(f"video {video.id} {video.status}: {video.error.message if video.error else ''}", file=sys.stderr)
        return 1
    client.videos.download_content(video.id).write_to_file(out)
    print(f"wrote {out} ({video.id}, {video.size}, {video.model_extra.get('duration_s', video.seconds)} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
