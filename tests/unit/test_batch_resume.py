"""What a rerun trusts: earlier ok lines, videos on disk, and the leftovers of a killed run."""

from __future__ import annotations

import json
from pathlib import Path

from wan_spmd.batch import ResultsLog, is_done, read_done, remove_stale_parts, scan_line


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


def test_remove_stale_parts_only_touches_its_own_video(tmp_path: Path):
    """A killed write leaves `.{stem}-XXXXXXXX.mp4.part`; the rerun deletes that one but never a
    neighbour's (another shard may be writing it right now)."""
    mine = tmp_path / ".a-abcd_123.mp4.part"
    neighbour = tmp_path / ".a-b-abcd1234.mp4.part"
    for p in (mine, neighbour, tmp_path / "a.mp4"):
        p.write_bytes(b"x")
    assert remove_stale_parts(tmp_path / "a.mp4") == [mine]
    assert neighbour.exists() and (tmp_path / "a.mp4").exists()
    assert remove_stale_parts(tmp_path / "missing" / "z.mp4") == []
