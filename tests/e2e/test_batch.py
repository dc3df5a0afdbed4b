"""`wan_spmd batch` as a user drives it: a mixed file under a real 2-rank torchrun (gloo, tiny
model), a kill mid-batch and the rerun that resumes it, shards, and bad arguments."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import EXAMPLE_IMAGE, cli_env, run_cli
from wan_spmd.video import part_name, probe_mp4

# Small enough that a job takes about a second on 2 CPU ranks.
FAST = {"size": "32x32", "num_frames": 5, "num_inference_steps": 1}


def write_jsonl(path: Path, lines: list[object]) -> Path:
    """Objects become JSON lines; strings are written as they are (bad or blank lines)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_results(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def by_line(records: list[dict]) -> dict[int, dict]:
    return {r["line"]: r for r in records}


def test_bad_arguments_exit_2_before_torch(tmp_path: Path):
    """The batch command's own mistakes (missing file, bad shard numbers) must end in one line and
    exit 2 without loading torch, so a scheduler sees a usage error at once, not after a model load."""
    requests = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "cat"}])
    cases = [
        (["batch", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "o")], "does not exist"),
        (
            ["batch", str(requests), "--output-dir", str(tmp_path / "o"), "--shard-index", "2", "--num-shards", "2"],
            "within 0..1",
        ),
        (["batch", str(requests), "--output-dir", str(tmp_path / "o"), "--num-shards", "2"], "together"),
    ]
    probe = (
        "import sys; from wan_spmd.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "except SystemExit as e:\n    print('torch' in sys.modules, e.code)\n"
    )
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=cli_env())
        assert proc.stdout.split() == ["False", "2"], proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_sharded_outputs_that_collide_are_refused_before_work(tmp_path: Path):
    """Issue 33.5: two lines of different shards that write one file (ids `a_b` and `a/b` both map
    to a_b.mp4; one explicit output given twice). Every shard reads the whole file and refuses it
    with one line naming both lines, exit 2, before torch loads or anything is written. If this
    fails, the shards overwrite each other's video and both report ok."""
    from wan_spmd.batch import scan_line, shard_of

    def shard(obj: dict) -> int:
        return shard_of(scan_line(1, json.dumps(obj).encode()), 2)

    n = next(i for i in range(100) if shard({"id": f"a_b{i}"}) != shard({"id": f"a/b{i}"}))
    m = next(i for i in range(100) if shard({"id": f"x{i}"}) != shard({"id": f"y{i}"}))
    files = {
        "ids": [{"prompt": "one", "id": f"a_b{n}"}, {"prompt": "two", "id": f"a/b{n}"}],
        "outputs": [
            {"prompt": "one", "id": f"x{m}", "output": "same.mp4"},
            {"prompt": "two", "id": f"y{m}", "output": "same.mp4"},
        ],
    }
    probe = (
        "import sys; from wan_spmd.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "except SystemExit as e:\n    print('torch' in sys.modules, e.code)\n"
    )
    for name, lines in files.items():
        requests = write_jsonl(tmp_path / f"{name}.jsonl", ["", *lines])
        for index in ("0", "1"):
            args = [
                "batch",
                str(requests),
                "--output-dir",
                str(tmp_path / "o"),
                "--shard-index",
                index,
                "--num-shards",
                "2",
            ]
            proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=cli_env())
            assert proc.stdout.split() == ["False", "2"], proc.stdout + proc.stderr
            assert proc.stderr.count("\n") == 1 and "lines 2 " in proc.stderr and " and 3 " in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_mixed_file_under_torchrun(tiny_i2v, tmp_path: Path):
    """Good and bad lines in one file under 2 ranks: if this fails, a bad line stops (or hangs) the
    batch, a bad line reaches the other ranks, the manifest loses a line or its reason, duplicates are
    redone, an `output` escapes OUT, or the exit code hides failures."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "link").symlink_to(outside)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "cat.png").write_bytes(EXAMPLE_IMAGE.read_bytes())
    (tmp_path / "img" / "bad.png").write_text("not an image")
    good = {"prompt": "a cat", "image": "img/cat.png", "seed": 1, **FAST}
    lines = [
        good,  # 1: ok, derived id, default name
        {
            "id": "dog",
            "prompt": "a dog",
            "image": str(EXAMPLE_IMAGE),
            "size": "48x32",
            "num_frames": 9,
            "num_inference_steps": 1,
            "output": "sub/dog.mp4",
            "extra": 1,
        },  # 2: ok, absolute image, subfolder
        "{not json",  # 3
        "",  # 4: blank, not a job
        {**good, "num_frames": 4},  # 5: invalid parameter
        {**good, "image": "img/missing.png"},  # 6: missing image
        dict(reversed(list(good.items()))),  # 7: duplicate of 1 (keys reordered)
        {"id": "dog", "prompt": "another dog", "image": "img/cat.png", **FAST},  # 8: id clash
        {**good, "output": "../evil.mp4"},  # 9
        {**good, "output": str(outside / "abs.mp4")},  # 10
        {**good, "output": "link/escape.mp4"},  # 11: symlink out of OUT
        {**good, "output": "a\\..\\..\\evil.mp4"},  # 12
        {**good, "image": "img/bad.png"},  # 13: unreadable image
    ]
    requests = write_jsonl(tmp_path / "requests.jsonl", lines)

    proc = run_cli(["batch", str(requests), "--output-dir", str(out), "--model", "tiny"], nproc=2)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "batch: 2 ok, 9 failed, 1 skipped" in proc.stdout, proc.stdout + proc.stderr[-3000:]

    records = read_results(out / "results.jsonl")
    assert sorted(r["line"] for r in records) == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    rec = by_line(records)
    assert {n for n, r in rec.items() if r["status"] == "ok"} == {1, 2}
    assert rec[7]["status"] == "skipped" and rec[7]["note"] == "duplicate of line 1" and rec[7]["id"] == rec[1]["id"]
    expected_errors = {
        3: "not JSON",
        5: "num_frames 4 must be 4k+1",
        6: "cannot read image",
        8: "already used by line 2",
        9: "'..'",
        10: "absolute",
        11: "outside --output-dir",
        12: "backslash",
        13: "not a readable image",
    }
    for n, message in expected_errors.items():
        assert rec[n]["status"] == "failed" and message in rec[n]["error"], rec[n]
    assert rec[3]["id"] is None and rec[2]["id"] == "dog"
    assert set(rec[1]["timings_ms"]) >= {"Denoising", "Decoding", "PipelineWall"}
    assert rec[1]["peak_memory_mb"] is None  # the CPU: no peak GPU memory, never a made-up one
    assert rec[2]["warnings"] == ["ignored unknown keys: extra"]

    assert rec[1]["output"] == f"{rec[1]['id']}.mp4" and rec[2]["output"] == "sub/dog.mp4"
    first, dog = probe_mp4(out / rec[1]["output"]), probe_mp4(out / "sub" / "dog.mp4")
    assert (first["num_frames"], first["width"], first["height"]) == (5, 32, 32)
    assert (dog["num_frames"], dog["width"], dog["height"]) == (9, 48, 32)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(
        [
            "requests.jsonl",
            "img/cat.png",
            "img/bad.png",
            "out/results.jsonl",
            f"out/{rec[1]['output']}",
            "out/sub/dog.mp4",
        ]
    )
    assert not any(outside.iterdir()) and not (tmp_path / "evil.mp4").exists()


def _children(pid: int) -> list[int]:
    """The processes torchrun started (its ranks run in their own sessions)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def test_sigterm_mid_batch_then_resume(tiny_i2v, tmp_path: Path):
    """SIGTERM a 2-rank batch under torchrun after its first video (as Slurm or Kubernetes preempt
    it), then rerun it. If this fails, a preempted batch looks finished (exit 0), a rank outlives
    the grace period, the line in flight is not recorded or leaves a temporary file, or the rerun
    redoes finished videos, loses unfinished ones, or trips over what a kill mid-write leaves."""
    count = 6
    lines = [
        {
            "id": f"clip{i}",
            "prompt": f"clip {i}",
            "image": str(EXAMPLE_IMAGE),
            "seed": i,
            **FAST,
            "num_inference_steps": 2,
        }
        for i in range(count)
    ]
    requests = write_jsonl(tmp_path / "requests.jsonl", lines)
    out = tmp_path / "out"
    results = out / "results.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "wan_spmd",
        "batch",
        str(requests),
        "--output-dir",
        str(out),
        "--stop-grace",
        "10",
    ]
    proc = subprocess.Popen(
        cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, text=True
    )
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (results.exists() and '"ok"' in results.read_text()):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no video within 120 s"
            ranks = _children(proc.pid) or ranks
            time.sleep(0.05)
        ranks = _children(proc.pid) or ranks
        os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler preempts: torchrun passes it to the ranks
        signalled = time.monotonic()
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read()
        gone_after = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in ranks:  # make sure before the rerun
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert code != 0, stderr[-3000:]
    assert gone_after < 10 + 20, f"torchrun took {gone_after:.0f} s to end after SIGTERM"  # grace + wide margin
    assert not any(_alive(pid) for pid in ranks)
    assert "rank 1 exits with status 0" in stderr or "rank 1 exits" in stderr, stderr[-3000:]
    records = read_results(results)
    finished = {r["id"] for r in records if r["status"] == "ok"}
    assert 1 <= len(finished) < count, "the signal must land mid-batch"
    interrupted = [r for r in records if r["status"] == "interrupted"]
    assert len(interrupted) == 1 and "SIGTERM" in interrupted[0]["error"], records
    assert not list(out.glob(".*.part"))  # the line in flight left no temporary file
    before = {i: (out / f"{i}.mp4").stat() for i in finished}
    # Leave what a SIGKILL mid-write would leave, made by the writer's own naming: a temporary mp4
    # of an unfinished job, and a results line cut short.
    unfinished = sorted({f"clip{i}" for i in range(count)} - finished)[0]
    part = part_name(out / f"{unfinished}.mp4")
    part.write_bytes(b"\x00" * 100)
    with results.open("a") as f:
        f.write('{"id": "' + unfinished + '", "sta')

    proc2 = run_cli(["batch", str(requests), "--output-dir", str(out)], nproc=2)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert f"{count - len(finished)} ok, 0 failed, {len(finished)} skipped" in proc2.stdout, proc2.stdout

    for i, st in before.items():
        now = (out / f"{i}.mp4").stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{i} was redone"
    ok = [r for r in read_results_lenient(results) if r["status"] == "ok"]
    assert sorted(r["id"] for r in ok) == [f"clip{i}" for i in range(count)]  # each ok exactly once
    assert sorted(p.name for p in out.iterdir()) == sorted([f"clip{i}.mp4" for i in range(count)] + ["results.jsonl"])
    assert probe_mp4(out / f"{unfinished}.mp4")["num_frames"] == 5


def read_results_lenient(path: Path) -> list[dict]:
    """The results of a run that was killed: a torn line is passed over."""
    records = []
    for text in path.read_text().splitlines():
        try:
            records.append(json.loads(text))
        except ValueError:
            pass
    return records


def test_shards_cover_every_line_once(tiny_i2v, tmp_path: Path):
    """K shard runs (one process each, as K scheduler tasks) must together record every line exactly
    once, identical lines in the same shard; if this fails, a fanned-out batch drops or repeats work."""
    # The image path relative to the JSONL file: ids hash the path as written, so an absolute path
    # would make the shard of each line depend on where the checkout lives.
    shutil.copy(EXAMPLE_IMAGE, tmp_path / "example.png")
    lines: list[object] = []
    for i in range(6):
        lines.append({"prompt": f"p{i}", "image": "example.png", "seed": i, **FAST})
    lines += [lines[0], lines[3], "oops", "", "[1]", {"prompt": "bad", "image": "example.png", "fps": 0}]
    requests = write_jsonl(tmp_path / "requests.jsonl", lines)
    out = tmp_path / "out"
    codes = []
    for k in range(2):
        proc = run_cli(["batch", str(requests), "--output-dir", str(out), "--shard-index", str(k), "--num-shards", "2"])
        codes.append(proc.returncode)
    shards = [read_results(out / f"results-{k}-of-2.jsonl") for k in range(2)]
    # each run exits 1 exactly when its shard recorded a failure
    assert codes == [int(any(r["status"] == "failed" for r in s)) for s in shards], codes
    seen = [r["line"] for s in shards for r in s]
    assert sorted(seen) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12]
    statuses = {r["line"]: (r["status"], r.get("note")) for s in shards for r in s}
    assert statuses[7] == ("skipped", "duplicate of line 1") and statuses[8] == ("skipped", "duplicate of line 4")
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(
        r["output"] for s in shards for r in s if r["status"] == "ok"
    )
    assert sum(r["status"] == "ok" for s in shards for r in s) == 6
    assert {r["line"] for r in shards[0] if r["id"] is None} == {9, 11}  # unparseable: by line number
    assert [r["status"] for s in shards for r in s if r["line"] == 12] == ["failed"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie whose parent (torchrun) is gone is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
