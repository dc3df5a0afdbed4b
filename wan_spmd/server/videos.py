"""The video job store: what became of every job, as OpenAI's video object, kept under --output-dir.

Apart from the admission queue (queue.py), which says what runs next and holds the futures: the
store says what each job is (queued, in_progress, completed, failed), how far it got, and where its
files are. Each record is one JSON file, `<output-dir>/jobs/<id>.json`, replaced atomically on every
change of status (a rename, so a crash leaves the old record or the new one, never half of one), and
read back at start-up: finished jobs stay listed and downloadable after a restart, and jobs that
were queued or running when the server died are failed, saying so. Progress lives in memory only
(a restart fails the job anyway).

Thread-safe: the HTTP thread creates, reads and deletes; rank 0's main thread (the SPMD loop)
starts, advances and finishes. No torch.
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
    """OpenAI's type: a string ("4"); ours is num_frames / fps, so it may be "4.125"."""
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
    """{code, message} when failed: code is "cancelled", "server_restarted" or "generation_failed"."""
    video: str | None = None
    """The mp4's name under --output-dir (never shown to clients)."""
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    created: float = 0.0
    """Unix time with sub-second precision: the list's order (created_at is whole seconds)."""

    @classmethod
    def new(cls, video_id: str, params: GenerationParams, model: str, now: float) -> VideoRecord:
        return cls(
            id=video_id,
            status="queued",
            created_at=int(now),
            model=model,
            size=params.size,
            seconds=f"{params.seconds:g}",
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

    Retention applies to finished jobs only (unfinished ones are bounded by --max-queue): at most
    `keep_jobs` of them, the oldest finished going first, and each at most `ttl_s` seconds after it
    finished. A job that goes takes its record, mp4 and thumbnail with it.
    """

    def __init__(
        self,
        root: Path | None,
        replica: str,
        keep_jobs: int = 1000,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if keep_jobs < 1:
            raise ValueError(f"--keep-jobs must be >= 1, got {keep_jobs}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"--job-ttl must be positive, got {ttl_s:g}")
        self.root = root
        self.replica = check_replica_name(replica)
        self.keep_jobs = keep_jobs
        self.ttl_s = ttl_s
        self.clock = clock
        self._records: dict[str, VideoRecord] = {}
        self._lock = threading.RLock()

    # -- ids and start-up ---------------------------------------------------------------------

    def new_id(self) -> str:
        """`video_<replica>_<24 hex>`: random, so unique across replicas, and a balancer can route a
        poll to the replica that took the job by the prefix."""
        return f"video_{self.replica}_{secrets.token_hex(ID_HEX // 2)}"

    @property
    def records_dir(self) -> Path | None:
        return self.root / RECORDS_DIR if self.root is not None else None

    def load(self) -> int:
        """Read the records a previous run left; fail the ones it did not finish. Returns how many."""
        folder = self.records_dir
        if folder is None:
            return 0
        folder.mkdir(parents=True, exist_ok=True)
        loaded: list[VideoRecord] = []
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write the last run did not finish
                continue
            if path.suffix != ".json":
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
            self.prune()  # which also removes every temporary mp4 a killed run left: none is live yet
            return len(self._records)

    # -- what the HTTP thread does ----------------------------------------------------------------

    def add(self, record: VideoRecord) -> None:
        with self._lock:
            self._records[record.id] = record
            self._write(record)

    def get(self, video_id: str) -> VideoRecord | None:
        """A copy of the record (so a reader never sees a half-made change), None if unknown or expired."""
        with self._lock:
            self.prune()
            record = self._records.get(video_id)
            return None if record is None else VideoRecord(**asdict(record))

    def page(self, limit: int, after: str | None, order: str) -> tuple[list[VideoRecord], bool]:
        """(records, has_more): up to `limit` after the record `after`, oldest first for "asc".
        KeyError if `after` is unknown."""
        with self._lock:
            self.prune()
            ordered = list(self._records.values())
            if order == "desc":
                ordered.reverse()
            start = 0
            if after is not None:
                ids = [r.id for r in ordered]
                start = ids.index(after) + 1 if after in ids else -1
                if start < 0:
                    raise KeyError(after)
            chosen = ordered[start : start + limit]
            return [VideoRecord(**asdict(r)) for r in chosen], start + limit < len(ordered)

    def delete(self, video_id: str) -> VideoRecord | None:
        """Forget the job and remove its files; None if unknown. A running job's loop learns of it
        through its queue entry (the caller withdraws it) and its outcome finds no record."""
        with self._lock:
            record = self._records.pop(video_id, None)
            if record is not None:
                self._remove_files(record)
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
        """After each denoising step: at most 99 until the mp4 exists (decoding is still ahead)."""
        with self._lock:
            record = self._records.get(video_id)
            if record is not None and not record.finished:
                record.progress = max(record.progress, min(99, step * 100 // max(total, 1)))

    def complete(self, video_id: str, video: Path, timings: dict[str, float]) -> bool:
        """The mp4 is in place. False (and the file removed) if the job was deleted meanwhile."""
        with self._lock:
            record = self._records.get(video_id)
            if record is None:
                video.unlink(missing_ok=True)
                return False
            record.status, record.progress, record.error = "completed", 100, None
            record.video = video.name if self.root is not None and video.parent == self.root else str(video)
            record.timings = {k: round(v, 3) for k, v in timings.items()}
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
            self.remove_stale_parts()
            return len(gone)

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
        """Replace the record's file atomically (write a hidden temporary file, then rename)."""
        folder = self.records_dir
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{record.id}.{secrets.token_hex(4)}.tmp"
        try:
            with tmp.open("w") as out:
                json.dump(asdict(record), out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, folder / f"{record.id}.json")
        except OSError as exc:  # a full disk must not break the answer; the record lives on in memory
            tmp.unlink(missing_ok=True)
            log.error("could not write the record of job %s: %s", record.id, exc)

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
