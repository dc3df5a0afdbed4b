"""Start-up: launch -> listening -> loaded -> ready, twice with one --compile-cache folder (the
first launch on an empty folder, the second reads what the first compiled).

  python3 benchmarks/startup.py --out OUT                       # one GPU: dummy I2V-A14B, both preset shapes
  python3 benchmarks/startup.py --out OUT --nproc 8             # under torchrun, 8 GPUs
  python3 benchmarks/startup.py --out OUT --dry-run             # the tiny model on the CPU (checks the script)

Each launch is `serve --port 0` as a user starts it; the times are read off its log lines as they
arrive (the clock is this script's, from just before the launch): `listening on` (HTTP answers, 503
until ready), `loaded` (this rank's weights made and parallelized) and `ready:`, whose split
(imports, load, compile with its cache hits, warm-up compute) is kept too. Then the server is
stopped with SIGTERM. OUT gets `startup.json` and each launch's log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKS = {"listening": "INFO listening on ", "loaded": "INFO loaded ", "ready": "INFO ready: "}


def serve_command(args: argparse.Namespace, cache: Path, output_dir: Path) -> list[str]:
    if args.dry_run:
        model = ["--model", "tiny", "--device", "cpu", "--warmup-shapes", "32x32x5,48x32x5"]
    else:
        model = ["--model", "wan2.2-i2v-a14b", "--load-format", "dummy", "--warmup-shapes", args.warmup_shapes]
    launcher = [sys.executable, "-m", "wan_spmd"]
    if args.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
        launcher += ["-m", "wan_spmd"]
    return [
        *launcher,
        "serve",
        *model,
        "--compile",
        "--compile-cache",
        str(cache),
        "--port",
        "0",
        "--output-dir",
        str(output_dir),
    ]


def launch(cmd: list[str], log_path: Path, timeout: float) -> dict:
    """Start the server, note when each mark's line arrives, stop it once ready."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    seen: dict[str, float] = {}
    split = ""
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            for mark, text in MARKS.items():
                if text in line and mark not in seen:
                    seen[mark] = round(time.perf_counter() - start, 2)
                    if mark == "ready":
                        split = re.sub(r".* in (imports .*?), writing videos.*", r"\1", line.strip())
            if "ready" in seen or time.perf_counter() - start > timeout:
                break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: torchrun and its ranks
        try:
            rest, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rest, _ = proc.communicate()
        lines.append(rest or "")
        log_path.write_text("".join(lines))
    if "ready" not in seen:
        raise SystemExit(f"the server did not get ready; see {log_path}")
    return {**seen, "split": split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--warmup-shapes", default="832x480x81,1280x720x81")
    parser.add_argument("--cache", type=Path, help="the --compile-cache folder (default: a new one under OUT)")
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="compile-cache-", dir=args.out))
    runs = {}
    for name in ("empty cache", "second launch"):
        cmd = serve_command(args, cache, args.out / "videos")
        runs[name] = launch(cmd, args.out / f"serve-{name.replace(' ', '-')}.log", args.timeout)
        print(f"{name}: {json.dumps(runs[name])}", flush=True)
    result = {"command": serve_command(args, cache, args.out / "videos")[1:], "runs": runs}
    (args.out / "startup.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| case | launch to listening | launch to loaded | launch to ready | ready line's split |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, run in runs.items():
        print(f"| {name} | {run['listening']:.1f} s | {run['loaded']:.1f} s | {run['ready']:.1f} s | {run['split']} |")


if __name__ == "__main__":
    main()
