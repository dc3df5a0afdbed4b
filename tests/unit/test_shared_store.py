"""Two job stores (server/videos.py) on one folder, as two replicas on one shared volume see it, with
a clock the tests move and the lease rounds called by hand: reads of the other's jobs, a DELETE
passed to the owner, and the jobs of a replica whose lease lapsed. The same with real servers is
tests/e2e/test_shared_jobs.py."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.test_video_store import Clock, _add, _finish
from wan_spmd.server.videos import DELETE_SUFFIX, REPLICAS_DIR, VideoStore, owner_of


def _pair(root: Path, clock: Clock, **kw) -> tuple[VideoStore, VideoStore]:
    a, b = VideoStore(root, "ra", clock=clock, **kw), VideoStore(root, "rb", clock=clock, **kw)
    a.load(), b.load()
    return a, b


def test_owner_is_read_from_the_id():
    """The owner comes from the id alone; anything else is no id (never a path). If this fails, a
    replica could take another's job for its own, or open a file a URL names."""
    assert owner_of("video_pod-7_0123456789abcdef01234567") == "pod-7"
    assert [owner_of(x) for x in ("video_a_..", "../x", "video__1", "video_a_1.json", "video_a_b_c")] == [None] * 5


def test_any_replica_reads_lists_and_serves_files_of_any_job(tmp_path):
    """A job made on A: B answers it by id, lists it among its own in creation order, sees its
    progress as A writes it, and finds its mp4. If this fails, a poll that a balancer sends to the
    other replica gets 404 (half of them with two replicas)."""
    clock = Clock()
    a, b = _pair(tmp_path, clock)
    first = _add(a, clock)
    second = _add(b, clock)
    third = _add(a, clock)
    assert b.get(first).status == "queued"
    a.start(first)
    a.progress(first, 1, 4)
    assert (b.get(first).status, b.get(first).progress) == ("in_progress", 25)
    mp4 = _finish(a, tmp_path, first)
    seen = b.get(first)
    assert (seen.status, seen.progress) == ("completed", 100) and b.video_file(seen) == mp4
    for store in (a, b):
        assert [r.id for r in store.page(10, None, "asc")[0]] == [first, second, third]
        records, more = store.page(1, first, "asc")
        assert [r.id for r in records] == [second] and more
    assert b.get("video_ra_000000000000000000000000") is None
    assert b.counts()["completed"] == 0 and a.counts()["completed"] == 1  # /metrics: each its own


def test_delete_elsewhere_is_gone_at_once_and_carried_out_by_the_owner(tmp_path):
    """DELETE on B of A's job: both answer 404 for it at once, A is told (so it withdraws a queued or
    running job) and removes its files, at its next step for a running job and at its next round
    for a finished one; B never writes A's record. If this fails, a deleted video keeps running or
    its files stay on the volume."""
    clock = Clock()
    a, b = _pair(tmp_path, clock)
    told: list[str] = []
    a.on_remote_delete = told.append
    running, done = _add(a, clock), _add(a, clock)
    mp4 = _finish(a, tmp_path, done)
    a.start(running)
    record_before = (tmp_path / "jobs" / f"{running}.json").read_text()
    assert b.delete(running).id == running
    assert (tmp_path / "jobs" / f"{running}.json").read_text() == record_before  # B wrote no record of A's
    assert a.get(running) is None and b.get(running) is None
    assert running not in [r.id for r in b.page(10, None, "asc")[0]]
    a.progress(running, 1, 4)  # A's next step
    assert told == [running]
    assert not list((tmp_path / "jobs").glob(f"{running}*"))

    assert b.delete(done) is not None
    assert b.get(done) is None and mp4.exists()
    a.watch()  # A's next lease round
    assert told == [running, done] and not mp4.exists()
    assert not list((tmp_path / "jobs").glob(f"*{DELETE_SUFFIX}"))


def test_a_lapsed_replica_s_jobs_are_failed_with_the_reason(tmp_path):
    """A renews its lease, then stops (killed): B fails A's unfinished jobs once A's lease file has
    not changed for lease_s seconds on B's clock, and not before; finished ones stay; a DELETE of
    a dead replica's job is carried out by B. If this fails, a job whose replica died stays
    in_progress forever, or a live replica's jobs are failed under it."""
    clock = Clock()
    a, b = _pair(tmp_path, clock, lease_s=10)
    running, done, queued = _add(a, clock), _add(a, clock), _add(a, clock)
    _finish(a, tmp_path, done)
    a.start(running)
    a._renew()
    assert b.watch() == []
    for _ in range(4):  # A alive: renewing every lease/4
        clock.now += 2.5
        a._renew()
        assert b.watch() == []
    clock.now += 9  # A dead: its lease file stays as it was
    assert b.watch() == [] and b.get(running).status == "in_progress"
    clock.now += 1
    assert b.watch() == ["ra"]
    for video_id in (running, queued):
        failed = b.get(video_id)
        assert failed.status == "failed" and failed.error["code"] == "replica_lost", failed
        assert "replica ra stopped renewing its lease" in failed.error["message"]
        assert json.loads((tmp_path / "jobs" / f"{video_id}.json").read_text())["status"] == "failed"
    assert b.get(done).status == "completed"
    assert not (tmp_path / "jobs" / REPLICAS_DIR / "ra.json").exists()
    b.delete(done)
    b.watch()
    assert not list((tmp_path / "jobs").glob(f"{done}*"))


def test_a_clean_stop_gives_the_lease_up_and_a_restart_keeps_its_jobs(tmp_path):
    """A stops cleanly (its lease file goes) and starts again under the same name: it keeps its
    finished jobs and B's are left alone. If this fails, a
    rolling restart loses videos, or a replica fails another's jobs at start-up."""
    clock = Clock()
    a, b = _pair(tmp_path, clock)
    mine, theirs = _add(a, clock), _add(b, clock)
    _finish(a, tmp_path, mine)
    a.keep_lease()
    assert (tmp_path / "jobs" / REPLICAS_DIR / "ra.json").exists()
    a.close()
    assert not (tmp_path / "jobs" / REPLICAS_DIR / "ra.json").exists()
    again = VideoStore(tmp_path, "ra", clock=clock)
    assert again.load() == 1
    assert again.get(mine).status == "completed" and again.get(theirs).status == "queued"
