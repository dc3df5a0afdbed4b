"""The results log and resume: one JSON line per request line, appended and synced as each ends.

Resume rule: a line is done when some `results*.jsonl` in the output folder (any shard's) has an ok
line with its id, parameters and output, and that video exists. A resumed run appends, so one id
may have several lines (interrupted, then ok; failed, then ok after the file was fixed): the last
line for an id is its current state, and an ok line anywhere makes it done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wan_spmd.batch.lines import Entry


def read_done(out_dir: Path) -> dict[str, set[tuple[str, str]]]:
    """id -> {(params_hash, output)} of every ok line in any results*.jsonl in OUT, whichever shard
    wrote it (a rerun with another --num-shards still skips finished work). A line cut short by a
    crash is not JSON and is passed over."""
    done: dict[str, set[tuple[str, str]]] = {}
    for results in sorted(out_dir.glob("results*.jsonl")):
        with results.open("rb") as f:
            for raw in f:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("status") == "ok" and record.get("id") is not None:
                    done.setdefault(str(record["id"]), set()).add(
                        (str(record.get("params_hash")), str(record.get("output")))
                    )
    return done


def is_done(entry: Entry, done: Mapping[str, set[tuple[str, str]]], out_dir: Path) -> bool:
    """Finished earlier: an ok line for the same id, parameters and output, and the video is there."""
    if entry.id is None or entry.output is None or entry.error is not None:
        return False
    if (entry.params_hash, str(entry.output)) not in done.get(entry.id, set()):
        return False
    return (out_dir / entry.output).is_file()


def remove_stale_parts(video: Path) -> list[Path]:
    """Delete the temporary files a run killed while writing `video` left beside it (the writer's
    own matcher, `video.stale_parts`, so another shard's video in flight is never touched)."""
    from wan_spmd.video import stale_parts

    removed = stale_parts(video)
    for part in removed:
        part.unlink(missing_ok=True)
    return removed


class ResultsLog:
    """Appends one JSON object per line, flushed and synced so a crash loses at most the job in
    flight. A last line cut short by an earlier crash is closed with a newline first, so the next
    line never joins it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("ab")
        if path.stat().st_size:
            with path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write(b"\n")

    def append(self, record: Mapping[str, Any]) -> None:
        try:
            data = json.dumps(record, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate from the line (its id): JSON's \u escape keeps it
            data = json.dumps(record, ensure_ascii=True).encode()
        self._file.write(data + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
