"""Image-to-video with the official `openai` package (pip install openai), as its docs show for
Sora: ask the server what its model takes, create the job, poll it until it is finished, download
the mp4. Start a server first, e.g.
    torchrun --nproc-per-node 2 -m wan_spmd serve --port 8000    # the tiny model; or --model DIR
then:  python examples/openai_client.py [image] [out.mp4]
Environment: BASE_URL (default http://localhost:8000/v1), API_KEY (when the server runs with --api-key),
SIZE (default: the model's own, from the image's aspect), SECONDS (default 4), NUM_INFERENCE_STEPS
(default: the model's), PROMPT, SEED.

The SDK's types list Sora's sizes and seconds only ("720x1280", ..., "4", "8", "12"): other sizes and
our own fields (num_inference_steps, seed, ...) go in `extra_body`, which the SDK sends as form fields.
`create` answers a queued job at once (as OpenAI's API does, for every client); `create_and_poll` then
polls it, so a job longer than any client timeout is never lost or started twice.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from openai import OpenAI


def model_card(client: OpenAI) -> dict[str, Any]:
    """The served model as GET /v1/models describes it (its size and frame limits where the server
    gives them)."""
    card = client.models.list().data[0]
    return card.model_dump()


def check_size(size: str, card: dict[str, Any]) -> str | None:
    """Why the model cannot take `size` (WxH), or None; unknown limits are left to the server."""
    try:
        width, height = (int(x) for x in size.lower().split("x"))
    except ValueError:
        return f"SIZE must be WIDTHxHEIGHT, got {size!r}"
    wide, tall = card.get("max_width"), card.get("max_height")
    if wide and tall and (width > wide or height > tall):
        return f"model {card['id']} takes at most {wide}x{tall}, not {size}"
    return None


def main() -> int:
    image = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("example.png"))
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "out.mp4")
    client = OpenAI(
        base_url=os.environ.get("BASE_URL", "http://localhost:8000/v1"),
        api_key=os.environ.get("API_KEY", "unused"),  # the SDK insists on one; a server without --api-key ignores it
    )
    card = model_card(client)
    limits = f"up to {card['max_width']}x{card['max_height']}" if card.get("max_width") else "its own limits"
    print(f"model {card['id']}: {limits}, {card.get('max_frames') or 'its own'} frames at most")
    extra: dict[str, Any] = {"seed": int(os.environ.get("SEED", "42"))}
    if os.environ.get("SIZE"):  # otherwise the model's default size for the image's aspect
        problem = check_size(os.environ["SIZE"], card)
        if problem:
            print(problem, file=sys.stderr)
            return 2
        extra["size"] = os.environ["SIZE"]
    if os.environ.get("NUM_INFERENCE_STEPS"):
        extra["num_inference_steps"] = int(os.environ["NUM_INFERENCE_STEPS"])
    with image.open("rb") as picture:
        video = client.videos.create_and_poll(
            model=card["id"],
            prompt=os.environ.get("PROMPT", "A cat in a small boat drifts across a calm lake at sunrise, cinematic"),
            input_reference=picture,
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
