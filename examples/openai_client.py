"""Image-to-video with the official `openai` package (pip install openai), as its docs show for
Sora: create the job, poll it until it is finished, download the mp4. Start a server first, e.g.
    torchrun --nproc-per-node 2 -m wan_spmd serve --model /path/to/Wan2.2-I2V-A14B-Diffusers --port 8000
then:  python examples/openai_client.py [image] [out.mp4]
Environment: BASE_URL (default http://localhost:8000/v1), API_KEY (when the server runs with --api-key),
SIZE, SECONDS, NUM_INFERENCE_STEPS (smaller for the tiny model), PROMPT, SEED.

The SDK's types list Sora's sizes and seconds only ("720x1280", ..., "4", "8", "12"): other sizes and
our own fields (num_inference_steps, seed, ...) go in `extra_body`, which the SDK sends as form fields.
The SDK's requests carry X-Stainless-* headers, so the server answers `create` with a queued job at once.
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
    with image.open("rb") as picture:
        video = client.videos.create_and_poll(
            prompt=os.environ.get("PROMPT", "A cat in a small boat drifts across a calm lake at sunrise, cinematic"),
            input_reference=picture,
            seconds=os.environ.get("SECONDS", "4"),
            extra_body={
                "size": os.environ.get("SIZE", "1280x720"),
                "num_inference_steps": int(os.environ.get("NUM_INFERENCE_STEPS", "40")),
                "seed": int(os.environ.get("SEED", "42")),
            },
            poll_interval_ms=1000,
        )
    if video.status != "completed":
        print(f"video {video.id} {video.status}: {video.error.message if video.error else ''}", file=sys.stderr)
        return 1
    client.videos.download_content(video.id).write_to_file(out)
    print(f"wrote {out} ({video.id}, {video.size}, {video.seconds} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
