"""A client that measures e2e against the server's PipelineWall (DESIGN.md's timing words).

  python benchmarks/serve_client.py URL --size 832x480 --num-frames 81 --steps 4 [--repeats 2]
      [--endpoint sync|json] [--label NAME]

Posts a multipart request with an input image (as vllm-omni's clients do), times from the first
byte sent to the last byte of the answer, and prints one JSON line per request: e2e, the server's
stage timings (the JSON body's `timings`, or the raw endpoint's Server-Timing header), overhead =
e2e - PipelineWall, and transfer = e2e - ServerTotal (the answer's bytes on the wire, the client's
own parsing). The prompt's negative prompt is the model's default: Wan's official one.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import httpx
from PIL import Image


def image_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buf, "PNG")
    return buf.getvalue()


def server_timing(header: str) -> dict[str, float]:
    """`Name;dur=12.3, ...` -> {Name: 12.3}."""
    out = {}
    for item in header.split(","):
        name, _, dur = item.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--size", default="832x480")
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    # json: the base64 answer of POST /v1/videos, synchronous on a server run with --sync-videos
    parser.add_argument("--endpoint", choices=("sync", "json"), default="json")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    files = {"input_reference": ("in.png", image_bytes(width, height), "image/png")}
    form = {
        "prompt": "a kite over a green hill",
        "size": args.size,
        "num_frames": str(args.num_frames),
        "num_inference_steps": str(args.steps),
        "guidance_scale": "3.5",
        "guidance_scale_2": "3.5",
        "seed": "1",
    }
    path = "/v1/videos/sync" if args.endpoint == "sync" else "/v1/videos"
    with httpx.Client(timeout=1800) as client:
        for i in range(args.repeats):
            start = time.perf_counter()
            response = client.post(f"{args.url}{path}", data=form, files=files)
            body = response.content  # the last byte is here
            e2e_ms = (time.perf_counter() - start) * 1000.0
            response.raise_for_status()
            if args.endpoint == "json":
                answer = json.loads(body)
                timings = answer["timings"]
                mp4_bytes = len(answer["data"][0]["b64_json"]) * 3 // 4
            else:
                timings = server_timing(response.headers["server-timing"])
                mp4_bytes = len(body)
            print(
                json.dumps(
                    {
                        "label": args.label,
                        "request": i + 1,
                        "endpoint": path,
                        "size": args.size,
                        "num_frames": args.num_frames,
                        "steps": args.steps,
                        "e2e_ms": round(e2e_ms, 1),
                        "pipeline_wall_ms": round(timings["PipelineWall"], 1),
                        "e2e_over_wall": round(e2e_ms / timings["PipelineWall"], 4),
                        "overhead_ms": round(e2e_ms - timings["PipelineWall"], 1),
                        "transfer_ms": round(e2e_ms - timings["ServerTotal"], 1),
                        "answer_bytes": len(body),
                        "mp4_bytes": mp4_bytes,
                        "timings_ms": {k: round(v, 1) for k, v in timings.items()},
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
