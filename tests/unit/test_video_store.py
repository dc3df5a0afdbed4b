"""The video job store (server/videos.py) on real files, with a clock the tests move: what survives a
restart, retention by count and age, and the async switch of POST /v1/videos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.datastructures import Headers

from wan_spmd.params import GenerationParams
from wan_spmd.server.routes.videos import wants_async
from wan_spmd.server.videos import RESTARTED, VideoRecord, VideoStore, check_replica_name, default_replica_name


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _params(**overrides) -> GenerationParams:
    fields = dict(
        prompt="a cat",
        negative_prompt="",
        image=None,
        width=64,
        height=48,
        num_frames=33,
        fps=8,
        num_inference_steps=4,
        guidance_scale=1.0,
        guidance_scale_2=1.0,
        boundary_ratio=0.9,
        flow_shift=5.0,
        seed=7,
    )
    return GenerationParams(**{**fields, **overrides})


def _store(root: Path, clock: Clock, **kw) -> VideoStore:
    return VideoStore(root, "r1", clock=clock, **kw)


def _add(store: VideoStore, clock: Clock) -> str:
    video_id = store.new_id()
    store.add(VideoRecord.new(video_id, _params(), "tiny", clock()))
    clock.now += 1
    return video_id


def _finish(store: VideoStore, root: Path, video_id: str) -> Path:
    """Run the job as the loop does: start, steps, an mp4 in place, complete."""
    store.start(video_id)
    mp4 = root / f"{video_id}.mp4"
    mp4.write_bytes(b"mp4 " + video_id.encode())
    assert store.complete(video_id, mp4, {"PipelineWall": 1.0})
    return mp4


def test_record_fields_ids_and_progress(tmp_path):
    """The object carries OpenAI's fields (seconds as a string, error as {code, message}), ids carry
    the replica name, and progress stops at 99 until the mp4 exists: if this fails, the OpenAI SDK
    mis-parses our objects, a balancer cannot route polls, or a client downloads before the file is there."""
    clock = Clock()
    store = _store(tmp_path, clock)
    video_id = _add(store, clock)
    assert video_id.startswith("video_r1_") and len(video_id) == len("video_r1_") + 24
    public = store.get(video_id).public()
    assert (public["object"], public["status"], public["progress"]) == ("video", "queued", 0)
    # 33 frames / 8 fps: whole seconds in `seconds` (clients call int() on it), the truth in duration_s
    assert (public["seconds"], public["duration_s"]) == ("4", 4.125)
    assert (public["file_name"], public["peak_memory_mb"], public["quality"]) == (None, None, "default")
    assert VideoRecord.new("v", _params(), "tiny", 0.0, seconds="5").public()["seconds"] == "5"  # as sent
    assert public["created_at"] == 1_800_000_000 and public["error"] is None and "video" not in public
    store.start(video_id)
    for step in range(1, 5):
        store.progress(video_id, step, 4)
    assert (store.get(video_id).status, store.get(video_id).progress) == ("in_progress", 99)
    _finish(store, tmp_path, video_id)
    done = store.get(video_id)
    assert (done.status, done.progress, done.completed_at, done.expires_at) == ("completed", 100, 1_800_000_001, None)


def test_restart_keeps_finished_and_fails_unfinished(tmp_path):
    """A store read back from disk (a restarted server): a completed job is still completed with its
    file, queued and running ones are failed saying the server restarted, a torn temporary file and
    an unreadable record are dropped. If this fails, a restart loses finished videos or leaves jobs
    queued forever."""
    clock = Clock()
    store = _store(tmp_path, clock)
    done, running, queued = _add(store, clock), _add(store, clock), _add(store, clock)
    mp4 = _finish(store, tmp_path, done)
    store.start(running)
    (tmp_path / "jobs" / ".video_r1_x.1234.tmp").write_text('{"id": "video_r1_x", "sta')
    (tmp_path / "jobs" / "video_r1_junk.json").write_text("not json")
    assert sorted(p.name for p in (tmp_path / "jobs").glob(".*")) == [".video_r1_x.1234.tmp"]

    again = _store(tmp_path, clock)
    assert again.load() == 3
    assert again.get(done).status == "completed" and again.video_file(again.get(done)) == mp4
    for video_id in (running, queued):
        record = again.get(video_id)
        assert (record.status, record.error) == ("failed", {"code": "server_restarted", "message": RESTARTED})
    assert not list((tmp_path / "jobs").glob(".*"))  # the torn write is gone
    on_disk = json.loads((tmp_path / "jobs" / f"{running}.json").read_text())
    assert on_disk["status"] == "failed"  # written back, so a second restart says the same
    assert [r.id for r in again.page(10, None, "asc")[0]] == [done, running, queued]


def test_keep_jobs_evicts_the_oldest_finished(tmp_path):
    """--keep-jobs 2: a third finished job takes the oldest finished one's record, mp4 and thumbnail
    with it; unfinished jobs are never evicted. If this fails, --output-dir grows without bound."""
    clock = Clock()
    store = _store(tmp_path, clock, keep_jobs=2)
    first, second, waiting, third = (_add(store, clock) for _ in range(4))
    first_mp4 = _finish(store, tmp_path, first)
    (tmp_path / "jobs" / f"{first}.jpg").write_bytes(b"jpg")
    _finish(store, tmp_path, second)
    _finish(store, tmp_path, third)
    assert store.get(first) is None
    assert not first_mp4.exists() and not (tmp_path / "jobs" / f"{first}.jpg").exists()
    assert not (tmp_path / "jobs" / f"{first}.json").exists()
    assert store.get(waiting).status == "queued"
    assert store.counts() == {"queued": 1, "in_progress": 0, "completed": 2, "failed": 0}


def test_ttl_sets_expires_at_and_removes_on_time(tmp_path):
    """--job-ttl 10: expires_at is completed_at + 10 (rounded up), the job is there until then and
    gone (files too) after. If this fails, expires_at lies or expired files stay forever."""
    clock = Clock(1_800_000_000.5)
    store = _store(tmp_path, clock, ttl_s=10)
    video_id = _add(store, clock)
    mp4 = _finish(store, tmp_path, video_id)
    record = store.get(video_id)
    assert record.expires_at == 1_800_000_012  # finished at ...001.5, + 10 s, rounded up
    clock.now = record.expires_at - 0.01
    assert store.get(video_id) is not None and mp4.exists()
    clock.now = record.expires_at
    assert store.get(video_id) is None and not mp4.exists()


def test_delete_and_complete_race(tmp_path):
    """A job deleted while its mp4 was being written: complete() finds no record and removes the
    file. If this fails, a deleted video's file is left behind on disk."""
    clock = Clock()
    store = _store(tmp_path, clock)
    video_id = _add(store, clock)
    store.start(video_id)
    assert store.delete(video_id) is not None and store.get(video_id) is None
    mp4 = tmp_path / "late.mp4"
    mp4.write_bytes(b"x")
    assert not store.complete(video_id, mp4, {})
    assert not mp4.exists()
    assert store.delete(video_id) is None


def test_pages(tmp_path):
    """Pages in either order with `after` and has_more, as the SDK's cursor pagination reads them."""
    clock = Clock()
    store = _store(tmp_path, clock)
    ids = [_add(store, clock) for _ in range(5)]
    records, more = store.page(2, None, "desc")
    assert [r.id for r in records] == ids[:-3:-1] and more
    records, more = store.page(2, ids[3], "desc")
    assert [r.id for r in records] == [ids[2], ids[1]] and more
    records, more = store.page(2, ids[2], "asc")
    assert [r.id for r in records] == ids[3:] and not more
    with pytest.raises(KeyError):
        store.page(2, "video_r1_gone", "asc")


def test_replica_names():
    """Replica names are DNS labels (they go into ids, file names and balancer rules)."""
    assert check_replica_name(default_replica_name()) == default_replica_name()
    for bad in ("", "a_b", "-a", "a.b", "x" * 64):
        with pytest.raises(ValueError, match="replica-name"):
            check_replica_name(bad)
    with pytest.raises(ValueError, match="keep-jobs"):
        VideoStore(None, "r1", keep_jobs=0)


@pytest.mark.parametrize(
    ("headers", "sync_videos", "expected"),
    [
        ({}, False, True),
        ({"User-Agent": "curl/8", "Accept": "application/json"}, False, True),
        ({}, True, False),
        ({"Prefer": "respond-async"}, True, True),
        ({"Prefer": "return=minimal, Respond-Async; wait=10"}, True, True),
        ({"Prefer": "wait=10"}, True, False),
        ({"X-Stainless-Lang": "python"}, True, True),
        ({"User-Agent": "curl/8", "Accept": "application/json"}, True, False),
    ],
)
def test_wants_async(headers, sync_videos, expected):
    """Who gets a queued job at once: everyone by default; with --sync-videos, only a client that asks
    (Prefer: respond-async) and the OpenAI SDK. If this fails, plain clients wait for the whole video
    (and lose it to their timeouts), curl | jq scripts lose their synchronous answer under
    --sync-videos, or the SDK's create blocks (and retries) for the whole video."""
    assert wants_async(Headers(headers), sync_videos) is expected


def test_stale_temporary_videos_are_removed_at_start_and_in_the_sweep(tmp_path):
    """Issue 33.4: a serve killed mid-write leaves `.<stamp>_<id>-<hex>.mp4.part` in --output-dir.
    The next start removes this replica's (no job is live then), and the retention sweep removes any
    whose job is no longer queued or running, never a running job's, another replica's or a file
    that is not a temporary video. If this fails, partial videos pile up in --output-dir for ever."""
    clock = Clock()
    stale = tmp_path / f".20261207-010203_video_r1_{'a' * 24}-{'0' * 12}.mp4.part"
    other_replica = tmp_path / f".20261207-010203_video_r2_{'b' * 24}-{'1' * 12}.mp4.part"
    not_ours = tmp_path / ".clip-0123456789ab.mp4.part"  # a batch's name: not this store's
    for path in (stale, other_replica, not_ours):
        path.write_bytes(b"\x00" * 10)
    store = _store(tmp_path, clock)
    store.load()
    assert not stale.exists() and other_replica.exists() and not_ours.exists()

    running = VideoRecord.new(store.new_id(), _params(), "tiny", clock())
    store.add(running)
    store.start(running.id)
    live_part = tmp_path / f".20261207-010203_{running.id}-{'2' * 12}.mp4.part"
    live_part.write_bytes(b"\x00" * 10)
    store.sweep()
    assert live_part.exists()  # its writer is still at work
    store.fail(running.id, "cancelled", "stopped")  # killed before its writer could clean up
    store.sweep()
    assert not live_part.exists() and other_replica.exists()
