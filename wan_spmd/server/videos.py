"""The video job store: what became of every job, as OpenAI's video object, kept under --output-dir.

Apart from the admission queue (queue.py), which says what runs next and holds the futures: the
store says what each job is (queued, in_progress, completed, failed), how far it got, and where its
files are. Each record is one JSON file, `<output-dir>/jobs/<id>.json`, replaced atomically on every
change of status or progress (a rename, so a crash leaves the old record or the new one, never half
of one), and read back at start-up: finished jobs stay listed and downloadable after a restart, and
jobs that were queued or running when the server died are failed, saying so.

Several replicas may share one --output-dir (a ReadWriteMany volume): any of them answers GET,
DELETE, content and list for any job, and each writes only its own jobs (the id names the owner,
`video_<replica>_<hex>`). The layout under `jobs/`:

    <id>.json              the record, written by its owner only (atomic rename)
    <id>.jpg               the thumbnail, made on first request (atomic rename)
    <id>.delete            a DELETE that reached another replica: readers treat the job as gone at
                           once; the owner stops the job (at its next step) and removes its files
    replicas/<name>.json   each replica's lease, renewed every lease/4 seconds

A replica whose lease file has not changed for --job-lease seconds, as another replica sees it on
its own clock (so no two clocks need to agree), is lapsed: any replica fails its unfinished jobs
with the reason, carries out DELETEs of its jobs and lets its expired jobs go (a job left behind by
a replica that never comes back has nobody else to do it).

Plain files rather than an object store through fsspec: the owner's writes need an atomic rename
(S3 and GCS have none), the engine streams each mp4 through ffmpeg into a local path and the HTTP
layer serves files by path; a POSIX shared volume (NFS, CephFS, EFS, Filestore) gives all three with
no new dependency, and the single-machine default is the same code on a local folder.

Thread-safe: the HTTP thread creates, reads and deletes; rank 0's main thread (the SPMD loop)
starts, advances and finishes; the lease thread renews, polls for DELETEs and fails lapsed
replicas' jobs. No torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wan_spmd.params import GenerationParams
from wan_spmd.video import PART_SUFFIX, PART_TOKEN_HEX, VideoWriteError, first_frame_jpeg

log = logging.getLogger("wan_spmd")

STATUSES = ("queued", "in_progress", "completed", "failed")
UNFINISHED = ("queued", "in_progress")
RECORDS_DIR = "jobs"
REPLICA_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
"""A DNS label: safe in a URL, a file name and a balancer's prefix rule."""
ID_HEX = 24
RESTARTED = "the server restarted before this video was finished; create it again"
LOST = (
    "replica {name} stopped renewing its lease on the job store for {lease:g} s (it died or lost the volume) "
    "before this video was finished; create it again"
)
LEASE_S = 60.0
REPLICAS_DIR = "replicas"
DELETE_SUFFIX = ".delete"
VIDEO_ID = re.compile(r"video_([A-Za-z0-9-]{1,63})_[A-Za-z0-9]{1,64}")
"""Ours: video_<replica>_<24 hex>; any such name is safe as a file name (no dot, no slash)."""


def owner_of(video_id: str) -> str | None:
    """The replica that made the job (from its id); None for a string that is no job id of ours."""
    found = VIDEO_ID.fullmatch(video_id)
    return found.group(1) if found else None


def inference_ms(timings: dict[str, float]) -> float:
    """From the loop starting the job to the mp4 in place: the pipeline, the loop's own share, and
    the encoding not overlapped with decoding (what vllm-omni's inference_time_s measures)."""
    return sum(timings.get(k, 0.0) for k in ("PipelineWall", "Dispatch", "Mp4Encoding"))


def default_replica_name() -> str:
    """The host name's first label, with anything a DNS label may not hold turned into '-'."""
    label = socket.gethostname().split(".")[0]
    label = re.sub(r"[^A-Za-z0-9-]", "-", label).strip("-")[:63].strip("-")
    return label or "replica"


def check_replica_name(name: str) -> str:
    if not REPLICA_NAME.fullmatch(name):
        raise ValueError(
            f"--replica-name {name!r} must be 1-63 letters, digits or '-' (not first or last), as a DNS label"
        )
    return name


@dataclass
class VideoRecord:
    """One job. The public fields are OpenAI's video object plus ours (frames, fps, seed, timings)."""

    id: str
    status: str
    created_at: int
    model: str
    size: str
    seconds: str
    """OpenAI's type, a string: as the client sent it ("4"), else the duration in whole seconds
    (clients call int() on it); the true duration is `duration_s`."""
    prompt: str
    num_frames: int
    fps: int
    seed: int
    progress: int = 0
    """Percent of the denoising steps done; 100 only once the mp4 exists."""
    completed_at: int | None = None
    """When it finished, completed or failed."""
    expires_at: int | None = None
    """When its files go (completed_at + --job-ttl); None without a TTL (--keep-jobs may still evict it)."""
    error: dict[str, str] | None = None
    """{code, message} when failed: code is "cancelled", "server_restarted", "replica_lost"
    (its replica's lease lapsed) or "generation_failed"."""
    video: str | None = None
    """The mp4's name under --output-dir (never shown to clients)."""
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    created: float = 0.0
    """Unix time with sub-second precision: the list's order (created_at is whole seconds)."""
    duration_s: float = 0.0
    """num_frames / fps: the video's true length."""
    adjusted: dict[str, dict[str, str]] = field(default_factory=dict)
    """{field: {requested, used}} for a size or frame count rounded to what the model takes."""
    quality: str = "default"
    """vllm-omni's field; one quality here."""
    file_name: str | None = None
    """The mp4's name as downloads give it (`<id>.mp4`), once completed."""
    stage_durations: dict[str, float] = field(default_factory=dict)
    """The timings in seconds (vllm-omni's field and unit), once completed."""
    peak_memory_mb: float | None = None
    """The job's peak GPU memory reserved, MiB, the maximum over ranks, once completed (null on the CPU)."""
    inference_time_s: float | None = None
    """Seconds from the loop starting the job to the mp4 in place, once completed."""

    @classmethod
    def new(
        cls, video_id: str, params: GenerationParams, model: str, now: float, seconds: str | None = None
    ) -> VideoRecord:
        return cls(
            id=video_id,
            status="queued",
            created_at=int(now),
            model=model,
            size=params.size,
            seconds=seconds if seconds is not None else str(max(1, round(params.seconds))),
            duration_s=round(params.seconds, 6),
            adjusted={name: {"requested": asked, "used": used} for name, asked, used in params.adjusted},
            prompt=params.prompt,
            num_frames=params.num_frames,
            fps=params.fps,
            seed=params.seed,
            warnings=list(params.warnings),
            created=now,
        )

    def public(self) -> dict[str, Any]:
        """The video object as clients see it."""
        out = asdict(self)
        del out["video"], out["created"]
        return {"id": self.id, "object": "video", **{k: v for k, v in out.items() if k != "id"}}

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED


class VideoStore:
    """Records by id, in creation order, mirrored to `<root>/jobs/*.json` (root None: memory only).

    This replica's own records live in memory (it is their only writer); other replicas' records are
    read from the folder when asked for (a GET reads the file, a list rereads only files that
    changed). Retention applies to finished jobs only (unfinished ones are bounded by --max-queue):
    at most `keep_jobs` of them per replica, the oldest finished going first, and each at most
    `ttl_s` seconds after it finished. A job that goes takes its record, mp4 and thumbnail with it.
    """

    def __init__(
        self,
        root: Path | None,
        replica: str,
        keep_jobs: int = 1000,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.time,
        lease_s: float = LEASE_S,
    ) -> None:
        if keep_jobs < 1:
            raise ValueError(f"--keep-jobs must be >= 1, got {keep_jobs}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"--job-ttl must be positive, got {ttl_s:g}")
        if not lease_s > 0:
            raise ValueError(f"--job-lease must be a positive number of seconds, got {lease_s:g}")
        self.root = root
        self.replica = check_replica_name(replica)
        self.keep_jobs = keep_jobs
        self.ttl_s = ttl_s
        self.clock = clock
        self.lease_s = lease_s
        self.on_remote_delete: Callable[[str], None] | None = None
        """Called (lease thread or main thread) with one of our job ids that another replica was
        asked to DELETE, before its files go: the serve front withdraws it from the queue or loop."""
        self._records: dict[str, VideoRecord] = {}
        self._lock = threading.RLock()
        self._foreign: dict[str, tuple[tuple[int, int, int], VideoRecord]] = {}
        """Other replicas' records by file name: (inode, mtime_ns, size) when read, and the record."""
        self._seen: dict[str, tuple[str | None, float]] = {}
        """Other replicas' lease files: (content, when this replica saw it change, on its clock)."""
        self._lease_written: str | None = None
        self._lease_beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- ids and start-up ---------------------------------------------------------------------

    def new_id(self) -> str:
        """`video_<replica>_<24 hex>`: random, so unique across replicas, and a balancer can route a
        poll to the replica that took the job by the prefix."""
        return f"video_{self.replica}_{secrets.token_hex(ID_HEX // 2)}"

    @property
    def records_dir(self) -> Path | None:
        return self.root / RECORDS_DIR if self.root is not None else None

    def _mine(self, video_id: str) -> bool:
        return owner_of(video_id) == self.replica

    def load(self) -> int:
        """Read the records this replica's previous run left; fail the ones it did not finish, carry
        out DELETEs of them that other replicas took meanwhile. Returns how many are kept."""
        folder = self.records_dir
        if folder is None:
            return 0
        folder.mkdir(parents=True, exist_ok=True)
        loaded: list[VideoRecord] = []
        deleted = set()
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                if self._mine(path.name[1:].split(".", 1)[0]):
                    path.unlink(missing_ok=True)  # a write our last run did not finish
                continue
            if path.suffix == DELETE_SUFFIX and self._mine(path.stem):
                deleted.add(path.stem)
            if path.suffix != ".json" or not self._mine(path.stem):
                continue
            try:
                record = VideoRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipping unreadable job record %s: %s", path.name, exc)
                continue
            if record.status in UNFINISHED:
                self._fail(record, "server_restarted", RESTARTED)
                self._write(record)
            elif record.status == "completed" and not (record.video and (self.root / record.video).is_file()):
                log.warning("job %s: its video is gone from %s; dropping its record", record.id, self.root)
                self._remove_files(record)
                continue
            loaded.append(record)
        with self._lock:
            self._records = {r.id: r for r in sorted(loaded, key=lambda r: r.created)}
            for video_id in deleted:
                self._carry_out_delete(video_id)
            self.sweep()  # the temporary mp4s a killed run left go too: none of its jobs is live
            return len(self._records)

    # -- what the HTTP thread does ----------------------------------------------------------------

    def add(self, record: VideoRecord) -> None:
        with self._lock:
            self._records[record.id] = record
            self._write(record)

    def get(self, video_id: str) -> VideoRecord | None:
        """A copy of the record (so a reader never sees a half-made change), None if unknown, expired
        or deleted (on any replica)."""
        with self._lock:
            self.prune()
            record = self._records.get(video_id)
            if record is not None:
                return None if self._delete_requested(video_id) else VideoRecord(**asdict(record))
        if self.records_dir is None or owner_of(video_id) is None or self._delete_requested(video_id):
            return None
        return self._visible(self._read(self.records_dir / f"{video_id}.json"))

    def page(self, limit: int, after: str | None, order: str) -> tuple[list[VideoRecord], bool]:
        """(records, has_more): up to `limit` after the record `after`, oldest first for "asc", over
        every replica's jobs in the store. KeyError if `after` is unknown."""
        foreign, deleted = self._scan()
        with self._lock:
            self.prune()
            ordered = [r for r in self._records.values() if r.id not in deleted]
        ordered = [VideoRecord(**asdict(r)) for r in ordered]
        ordered += [r for r in foreign if r.id not in deleted and self._visible(r) is not None]
        ordered.sort(key=lambda r: r.created)
        if order == "desc":
            ordered.reverse()
        start = 0
        if after is not None:
            ids = [r.id for r in ordered]
            start = ids.index(after) + 1 if after in ids else -1
            if start < 0:
                raise KeyError(after)
        chosen = ordered[start : start + limit]
        return chosen, start + limit < len(ordered)

    def delete(self, video_id: str) -> VideoRecord | None:
        """Forget the job and remove its files; None if unknown. A running job's loop learns of it
        through its queue entry (the caller withdraws it) and its outcome finds no record. Another
        replica's job: leave a delete request beside its record (every replica treats the job as
        gone from now on); its owner stops the job and removes the files."""
        with self._lock:
            record = self._records.pop(video_id, None)
            if record is not None:
                self._remove_files(record)
                return record
        record = self.get(video_id)
        if record is not None:
            self._atomic_write(self.records_dir / f"{video_id}{DELETE_SUFFIX}", self.replica)
        return record

    def video_file(self, record: VideoRecord) -> Path | None:
        if self.root is None or record.video is None:
            return None
        return self.root / record.video

    def thumbnail(self, video_id: str) -> Path | None:
        """A JPEG of the first frame, made from the mp4 on first use and kept beside the record;
        None if the job has no video (any more). Blocking (ffmpeg): call it from a worker thread."""
        record = self.get(video_id)
        mp4 = self.video_file(record) if record is not None else None
        if mp4 is None or record.status != "completed":
            return None
        jpg = self.records_dir / f"{video_id}.jpg"
        if not jpg.exists():
            try:
                first_frame_jpeg(mp4, jpg)
            except VideoWriteError:
                if self.get(video_id) is not None:
                    raise
        if self.get(video_id) is None:  # deleted or expired while ffmpeg ran: leave nothing behind
            jpg.unlink(missing_ok=True)
            return None
        return jpg

    def counts(self) -> dict[str, int]:
        """This replica's jobs by status (each replica's /metrics counts its own)."""
        with self._lock:
            out = dict.fromkeys(STATUSES, 0)
            for record in self._records.values():
                out[record.status] += 1
            return out

    # -- what the SPMD loop does (rank 0's main thread) ------------------------------------------------

    def start(self, video_id: str) -> None:
        with self._lock:
            record = self._records.get(video_id)
            if record is not None and record.status == "queued":
                record.status = "in_progress"
                self._write(record)

    def progress(self, video_id: str, step: int, total: int) -> None:
        """After each denoising step: at most 99 until the mp4 exists (decoding is still ahead).
        Written whenever the percentage moves, so that other replicas see it; a DELETE another
        replica took is carried out here, so the job stops at its next step."""
        with self._lock:
            record = self._records.get(video_id)
            if record is not None and not record.finished:
                percent = max(record.progress, min(99, step * 100 // max(total, 1)))
                if percent != record.progress:
                    record.progress = percent
                    self._write(record)
        if self._delete_requested(video_id):
            self._carry_out_delete(video_id)

    def complete(
        self, video_id: str, video: Path, timings: dict[str, float], peak_memory_mb: float | None = None
    ) -> bool:
        """The mp4 is in place. False (and the file removed) if the job was deleted meanwhile."""
        with self._lock:
            record = self._records.get(video_id)
            if record is None:
                video.unlink(missing_ok=True)
                return False
            record.status, record.progress, record.error = "completed", 100, None
            record.video = video.name if self.root is not None and video.parent == self.root else str(video)
            record.timings = {k: round(v, 3) for k, v in timings.items()}
            record.stage_durations = {k: round(v / 1000.0, 4) for k, v in timings.items()}
            record.inference_time_s = round(inference_ms(timings) / 1000.0, 4)
            record.file_name = f"{record.id}.mp4"
            record.peak_memory_mb = None if peak_memory_mb is None else round(peak_memory_mb, 1)
            self._finish(record)
            return True

    def fail(self, video_id: str, code: str, message: str) -> None:
        with self._lock:
            record = self._records.get(video_id)
            if record is not None and not record.finished:
                self._fail(record, code, message)
                self._write(record)
                self.prune()

    def fail_unfinished(self, code: str, message: str) -> int:
        """Fail every queued or running job (the server stops); returns how many."""
        with self._lock:
            unfinished = [r.id for r in self._records.values() if not r.finished]
            for video_id in unfinished:
                self.fail(video_id, code, message)
            return len(unfinished)

    # -- the lease and other replicas' DELETEs (the lease thread) -------------------------------------

    def keep_lease(self) -> None:
        """Renew this replica's lease now, then every lease/4 seconds on a thread of its own, which
        also carries out DELETEs that other replicas took for our jobs (each second) and fails the
        unfinished jobs of replicas whose lease lapsed."""
        if self.records_dir is None or self._thread is not None:
            return
        self._renew()
        self.watch()
        self._thread = threading.Thread(target=self._lease_loop, name="wan-job-lease", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop renewing and give the lease up (a replica that stopped cleanly has no unfinished
        jobs left for others to fail)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.records_dir is not None and self._lease_written is not None:
            (self.records_dir / REPLICAS_DIR / f"{self.replica}.json").unlink(missing_ok=True)

    def _lease_loop(self) -> None:
        period = self.lease_s / 4
        tick = min(1.0, period)
        last = time.monotonic()
        while not self._stop.wait(tick):
            try:
                with self._lock:
                    unfinished = [r.id for r in self._records.values() if not r.finished]
                for video_id in unfinished:  # a queued job deleted elsewhere leaves the queue now
                    if self._delete_requested(video_id):
                        self._carry_out_delete(video_id)
                if time.monotonic() - last >= period:
                    last = time.monotonic()
                    self._renew()
                    self.watch()
            except Exception:  # a lost volume must not end the thread; the next tick tries again
                log.exception("job store: the lease thread's round failed")

    def _renew(self) -> None:
        folder = self.records_dir / REPLICAS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.replica}.json"
        if self._lease_written is not None:
            try:
                found = path.read_text()
            except OSError:
                found = None
            if found is not None and found != self._lease_written:
                log.error(
                    "another live replica named %r renews the same lease in %s: give each replica its own "
                    "--replica-name",
                    self.replica,
                    self.root,
                )
        self._lease_beat += 1
        text = json.dumps(
            {
                "replica": self.replica,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "beat": self._lease_beat,
                "renewed_at": self.clock(),
            }
        )
        if self._atomic_write(path, text):
            self._lease_written = text

    def watch(self) -> list[str]:
        """One round of the lease watch: carry out DELETEs of our finished jobs taken elsewhere; note
        whose lease files changed, and for each other replica whose file has not changed for lease_s
        seconds (or is absent that long), fail its unfinished jobs, carry out DELETEs of its jobs and
        drop its expired ones. Returns the lapsed replicas."""
        if self.records_dir is None:
            return []
        foreign, deleted = self._scan()
        for video_id in deleted:
            if self._mine(video_id):
                self._carry_out_delete(video_id)
        leases = self.records_dir / REPLICAS_DIR
        names = {p.stem for p in leases.glob("*.json")} if leases.is_dir() else set()
        names |= {owner_of(r.id) for r in foreign} | {owner_of(v) for v in deleted}
        names.discard(self.replica)
        names.discard(None)
        now = self.clock()
        lapsed = []
        for name in sorted(names):
            try:
                content = (leases / f"{name}.json").read_text()
            except OSError:
                content = None
            seen = self._seen.get(name)
            if seen is None or seen[0] != content:
                self._seen[name] = (content, now)
            elif now - seen[1] >= self.lease_s:
                lapsed.append(name)
        for name in lapsed:
            self._take_over(name, [r for r in foreign if owner_of(r.id) == name], deleted)
        return lapsed

    def _take_over(self, name: str, records: list[VideoRecord], deleted: set[str]) -> None:
        """Do for a lapsed replica what it no longer can: fail its unfinished jobs, carry out DELETEs
        of its jobs, let its expired ones go."""
        now = self.clock()
        for record in records:
            if record.id in deleted or (record.expires_at is not None and record.expires_at <= now):
                self._remove_files(record)
                (self.records_dir / f"{record.id}{DELETE_SUFFIX}").unlink(missing_ok=True)
            elif not record.finished:
                record = self._read(self.records_dir / f"{record.id}.json")  # as it is now, not as cached
                if record is not None and not record.finished:
                    self._fail(record, "replica_lost", LOST.format(name=name, lease=self.lease_s))
                    self._write(record)
                    log.warning("job %s failed: replica %s's lease lapsed", record.id, name)
        for video_id in deleted:  # requests for records already gone
            if owner_of(video_id) == name and not (self.records_dir / f"{video_id}.json").exists():
                (self.records_dir / f"{video_id}{DELETE_SUFFIX}").unlink(missing_ok=True)
        lease = self.records_dir / REPLICAS_DIR / f"{name}.json"
        lease.unlink(missing_ok=True)  # nothing of it is unfinished now; it renews again if it lives
        self._seen[name] = (None, self._seen.get(name, (None, now))[1])

    def _delete_requested(self, video_id: str) -> bool:
        return self.records_dir is not None and (self.records_dir / f"{video_id}{DELETE_SUFFIX}").exists()

    def _carry_out_delete(self, video_id: str) -> None:
        """Another replica took a DELETE for one of our jobs: stop it, remove its files, then the request."""
        if self.on_remote_delete is not None:
            self.on_remote_delete(video_id)
        with self._lock:
            record = self._records.pop(video_id, None)
            if record is not None:
                self._remove_files(record)
        (self.records_dir / f"{video_id}{DELETE_SUFFIX}").unlink(missing_ok=True)
        log.info("video %s deleted through another replica", video_id)

    # -- reading the folder ----------------------------------------------------------------------

    def _read(self, path: Path) -> VideoRecord | None:
        try:
            return VideoRecord(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("skipping unreadable job record %s: %s", path.name, exc)
            return None

    def _visible(self, record: VideoRecord | None) -> VideoRecord | None:
        """None for another replica's job past its expires_at (its owner removes it at its next prune)."""
        if record is None or (record.expires_at is not None and record.expires_at <= self.clock()):
            return None
        return record

    def _scan(self) -> tuple[list[VideoRecord], set[str]]:
        """Other replicas' records in the folder (rereading only files that changed since the last
        scan), and the ids with a delete request."""
        folder = self.records_dir
        if folder is None or not folder.is_dir():
            return [], set()
        records, deleted, names = [], set(), set()
        for entry in os.scandir(folder):
            name = entry.name
            if name.endswith(DELETE_SUFFIX):
                deleted.add(name[: -len(DELETE_SUFFIX)])
                continue
            if not name.endswith(".json") or name.startswith(".") or self._mine(name[:-5]) or not entry.is_file():
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._foreign.get(name)
            if cached is None or cached[0] != key:
                record = self._read(Path(entry.path))
                if record is None:
                    continue
                cached = self._foreign[name] = (key, record)
            names.add(name)
            records.append(VideoRecord(**asdict(cached[1])))
        for gone in set(self._foreign) - names:  # the HTTP and lease threads both scan: pop, never del
            self._foreign.pop(gone, None)
        return records, deleted

    # -- retention and files --------------------------------------------------------------------

    def prune(self) -> int:
        """Drop expired finished jobs, then the oldest finished past --keep-jobs; returns how many."""
        with self._lock:
            now = self.clock()
            finished = sorted(
                (r for r in self._records.values() if r.finished), key=lambda r: (r.completed_at or 0, r.created)
            )
            gone = [r for r in finished if r.expires_at is not None and r.expires_at <= now]
            kept = [r for r in finished if r not in gone]
            gone += kept[: max(0, len(kept) - self.keep_jobs)]
            for record in gone:
                del self._records[record.id]
                self._remove_files(record)
            return len(gone)

    def sweep(self) -> int:
        """The retention sweep serve runs while idle: `prune`, and the temporary mp4s no live job of
        this replica owns (a listing of --output-dir, so not on every read as `prune` is)."""
        gone = self.prune()
        self.remove_stale_parts()
        return gone

    def remove_stale_parts(self) -> list[Path]:
        """Delete the temporary mp4s (`.<stamp>_<id>-<hex>.mp4.part`) of this replica's jobs that are
        not queued or running: a run killed mid-write left them. Returns what was removed."""
        if self.root is None or not self.root.is_dir():
            return []
        pattern = re.compile(
            rf"\.\d{{8}}-\d{{6}}_(video_{re.escape(self.replica)}_[0-9a-f]{{{ID_HEX}}})"
            rf"-[0-9a-f]{{{PART_TOKEN_HEX}}}{re.escape(PART_SUFFIX)}"
        )
        removed = []
        with self._lock:
            live = {r.id for r in self._records.values() if not r.finished}
            for path in self.root.iterdir():
                found = pattern.fullmatch(path.name)
                if found is None or found.group(1) in live:
                    continue
                try:
                    path.unlink(missing_ok=True)
                    removed.append(path)
                except OSError as exc:
                    log.warning("could not remove the temporary file %s: %s", path.name, exc)
        if removed:
            log.info("removed %d temporary video file(s) no running job owns", len(removed))
        return removed

    def _fail(self, record: VideoRecord, code: str, message: str) -> None:
        record.status, record.error = "failed", {"code": code, "message": message}
        self._finish(record, write=False)

    def _finish(self, record: VideoRecord, write: bool = True) -> None:
        now = self.clock()
        record.completed_at = int(now)
        # whole seconds, rounded up, so a client never finds the files gone before expires_at
        record.expires_at = None if self.ttl_s is None else -int(-(now + self.ttl_s) // 1)
        if write:
            self._write(record)
            self.prune()

    def _write(self, record: VideoRecord) -> None:
        """Replace the record's file atomically."""
        if self.records_dir is not None:
            self._atomic_write(self.records_dir / f"{record.id}.json", json.dumps(asdict(record)))

    def _atomic_write(self, path: Path, text: str) -> bool:
        """Write a hidden temporary file beside `path`, then rename it into place: a reader on any
        replica finds the old content or the new, never half of one. False (logged) on failure: a
        full disk must not break the answer; the record lives on in memory."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.stem}.{secrets.token_hex(4)}.tmp"
        try:
            with tmp.open("w") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            return True
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("could not write %s in the job store: %s", path.name, exc)
            return False

    def _remove_files(self, record: VideoRecord) -> None:
        folder = self.records_dir
        if folder is None:
            return
        paths = [folder / f"{record.id}.json", folder / f"{record.id}.jpg"]
        if record.video is not None:
            paths.append(self.root / record.video)
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s of job %s: %s", path.name, record.id, exc)
