"""What a rerun trusts: earlier ok lines, videos on disk, and the leftovers of a killed run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from wan_spmd.batch import ResultsLog, is_done, read_done, remove_stale_parts, scan_line
from wan_spmd.video import Mp4Writer


def test_results_log_repairs_a_line_cut_short(tmp_path: Path):
    """A crash mid-append must cost only that line: the next run's first line starts afresh."""
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"id": "a", "status": "ok"}\n{"id": "b", "sta')
    log = ResultsLog(path)
    log.append({"id": "c", "status": "ok"})
    log.close()
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[0])["id"] == "a" and json.loads(lines[-1])["id"] == "c"
    assert len(lines) == 3


def test_done_needs_ok_line_same_params_and_the_video(tmp_path: Path):
    """Resume must skip a job only when its ok line (same parameters, same output) and its video
    both exist; a failed line, a changed line or a missing video means redo."""
    entry = scan_line(1, b'{"prompt": "cat", "id": "a"}')
    changed = scan_line(1, b'{"prompt": "dog", "id": "a"}')
    other = scan_line(2, b'{"prompt": "cow", "id": "b"}')
    ok = {"id": "a", "status": "ok", "output": "a.mp4", "params_hash": entry.params_hash}
    failed = {"id": "b", "status": "failed", "output": None, "params_hash": other.params_hash}
    (tmp_path / "results-1-of-2.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(failed) + "\n{trunc")
    done = read_done(tmp_path)
    assert not is_done(entry, done, tmp_path)  # no video yet
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "b.mp4").write_bytes(b"x")
    assert is_done(entry, done, tmp_path)
    assert not is_done(changed, done, tmp_path)
    assert not is_done(other, done, tmp_path)


def test_remove_stale_parts_removes_what_a_killed_writer_left(tmp_path: Path):
    """A writer killed mid-video leaves its temporary file; the rerun must delete exactly that one,
    never a neighbour's (another shard may be writing `a-b.mp4` right now). The leftovers are made
    by the real writer, so the matcher cannot drift from the names it makes (it had: 8 characters
    expected, 12 written, and resume never cleaned anything)."""
    frames = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    left = []
    for name in ("a.mp4", "a-b.mp4"):
        writer = Mp4Writer(tmp_path / name, 16, 16, fps=8)
        writer.put(frames)
        writer._proc.kill()  # the process dies here: no finish, no abort
        writer._proc.wait()
        left.append(writer.tmp)
    (tmp_path / "a.mp4").write_bytes(b"x")
    assert all(p.exists() for p in left)
    assert remove_stale_parts(tmp_path / "a.mp4") == [left[0]]
    assert left[1].exists() and (tmp_path / "a.mp4").exists()
    assert remove_stale_parts(tmp_path / "missing" / "z.mp4") == []


def test_several_lines_for_one_id_the_last_counts(tmp_path: Path):
    """A resumed run appends, so one id may have several lines: interrupted, then ok; or ok, then
    (its video deleted) failed on the rerun. The last line per id is its state: the first job is
    done, the second is not (its ok line is older than its failure and its video is gone). If this
    fails, a resume redoes finished work or trusts an ok line its own later run contradicted."""
    entry_a = scan_line(1, b'{"prompt": "cat", "id": "a"}')
    entry_b = scan_line(2, b'{"prompt": "dog", "id": "b"}')
    log = ResultsLog(tmp_path / "results.jsonl")
    for entry, status in ((entry_a, "interrupted"), (entry_b, "ok"), (entry_a, "ok"), (entry_b, "failed")):
        output = str(entry.output) if status == "ok" else None
        log.append({"id": entry.id, "status": status, "output": output, "params_hash": entry.params_hash})
    log.close()
    (tmp_path / "a.mp4").write_bytes(b"video")  # b's video was deleted before the run that failed
    done = read_done(tmp_path)
    assert is_done(entry_a, done, tmp_path)
    assert not is_done(entry_b, done, tmp_path)


def test_interrupted_line_is_recorded_and_not_counted_done(tiny_t2v, tmp_path: Path, capsys):
    """SIGTERM while a line runs: the job stops at its next step or chunk, its line is recorded
    `interrupted` with the signal, and the progress bar does not count it as done (the rerun does
    it); the bar ends saying why it stopped short. If this fails, the bar claims work that was not
    done, or the interrupted line is lost."""
    from wan_spmd.batch import BatchFront, BatchSource
    from wan_spmd.config import generation_defaults, inspect_model_folder
    from wan_spmd.jobs import Outcome

    info = inspect_model_folder(tiny_t2v)
    requests = tmp_path / "r.jsonl"
    requests.write_text("".join(json.dumps({"prompt": p, "size": "32x32", "num_frames": 5}) + "\n" for p in "ab"))
    source = BatchSource(requests, tmp_path / "out", info=info, defaults=generation_defaults(info))
    job = source.next_job(1.0)
    BatchFront(source).on_signal("SIGTERM")  # the shutdown watch's call
    assert source.check_stop(job)  # the agreement at the next step says stop
    source.finish(Outcome.settle(job, stopped=True, error="cancelled at step 1 of 2"))
    assert source._bar.n == 0
    assert source.next_job(1.0).__name__ == "StopLoop"  # no further line starts
    (record,) = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "interrupted" and record["line"] == 1 and "stopped by SIGTERM" in record["error"]
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert source.summary.interrupted == 1 and source.summary.ok == 0
