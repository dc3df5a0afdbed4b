"""Pure logic of the batch front: ids, fingerprints, shards, output names, argument checks."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest

from wan_spmd.batch import (
    Entry,
    Shard,
    check_args,
    default_output_name,
    derive_id,
    fingerprint,
    output_path,
    safe_output_name,
    scan_line,
    shard_of,
)
from wan_spmd.params import RequestError


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_derived_id_ignores_key_order_blanks_and_id():
    """An unchanged line must keep its id across runs (else resume redoes everything), and a
    reformatted line (keys reordered, blank values) is the same request."""
    a = scan_line(1, line({"prompt": "cat", "seed": 1, "size": "32x32"}))
    b = scan_line(9, b'{"size": "32x32", "seed": 1, "negative_prompt": "", "prompt": "cat", "foo": 2}')
    assert a.id == b.id == derive_id(fingerprint({"prompt": "cat", "seed": 1, "size": "32x32"}))
    assert a.params_hash == b.params_hash
    assert scan_line(1, line({"prompt": "cat", "seed": 2, "size": "32x32"})).id != a.id


def test_output_and_image_are_part_of_the_fingerprint():
    """Two lines that differ only in output (or image) are two videos, not duplicates."""
    base = {"prompt": "cat", "image": "a.png"}
    ids = {scan_line(1, line(d)).id for d in (base, {**base, "output": "x.mp4"}, {**base, "image": "b.png"})}
    assert len(ids) == 3


def test_explicit_id_kept_and_bad_id_refused():
    """An explicit id names the job (and its default file); a non-string id is a bad line."""
    entry = scan_line(3, line({"prompt": "cat", "id": "shot/7"}))
    assert entry.id == "shot/7" and entry.error is None
    assert entry.output == PurePosixPath("shot_7.mp4")
    assert scan_line(3, line({"prompt": "cat", "id": 12})).id == "12"
    for bad in ({"x": 1}, True, "", [1]):
        bad_entry = scan_line(4, line({"prompt": "cat", "id": bad}))
        assert bad_entry.id is None and "id must be" in bad_entry.error


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "not a JSON object"),
        (b"\xff\xfe{}\n", "not UTF-8"),
    ],
)
def test_unparseable_lines_have_a_reason_and_no_id(raw: bytes, error: str):
    """A bad line must be recorded with its reason and sharded by its line number."""
    entry = scan_line(5, raw)
    assert entry.id is None and error in entry.error


def test_blank_lines_and_bom_are_ignored():
    assert scan_line(1, b"   \n") is None
    assert scan_line(1, "\ufeff".encode() + line({"prompt": "cat"})).error is None


@pytest.mark.parametrize(
    "name",
    [
        "../evil.mp4",
        "/etc/evil.mp4",
        "a/../../evil.mp4",
        "sub/../x.mp4",
        "a\\..\\..\\evil.mp4",
        ".hidden.mp4",
        "sub/.x.mp4",
        "a//b.mp4",
        "./x.mp4",
        "x.avi",
        "results.jsonl",
        ".mp4",
        "",
        "bad\x00name.mp4",
        "a\nb.mp4",
        "x" * 300 + ".mp4",
        7,
    ],
)
def test_output_names_that_could_leave_out_are_refused(name):
    """A line's `output` must never put a file outside --output-dir, overwrite the results or
    collide with write_mp4's hidden temporary files."""
    with pytest.raises(RequestError) as err:
        safe_output_name(name)
    assert err.value.field == "output"


def test_safe_output_names_pass_unchanged():
    assert safe_output_name("clip.mp4") == PurePosixPath("clip.mp4")
    assert safe_output_name("shots/day 1/clip-2.mp4") == PurePosixPath("shots/day 1/clip-2.mp4")
    assert safe_output_name("猫.mp4") == PurePosixPath("猫.mp4")


def test_default_names_from_unsafe_ids_stay_in_out():
    """The default name `{id}.mp4` must be a plain file name whatever the explicit id holds."""
    for job_id in ("../../etc/passwd", "/abs", "..", ".hidden", "a\\b", "x" * 500):
        name = default_output_name(job_id)
        assert len(name.parts) == 1 and not name.name.startswith(".") and name.suffix == ".mp4"
        assert len(name.name) <= 210


def test_symlinked_folder_out_of_out_is_refused(tmp_path: Path):
    """A folder inside OUT that is a symlink elsewhere must not carry a video out of OUT."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "link").symlink_to(outside)
    assert output_path(out, PurePosixPath("sub/x.mp4")) == out / "sub" / "x.mp4"
    with pytest.raises(RequestError):
        output_path(out, PurePosixPath("link/x.mp4"))


def test_shards_partition_every_line():
    """K runs must cover every line exactly once: ids by hash, unparseable lines by line number,
    and lines sharing an id in one shard (so duplicates are found)."""
    entries = [scan_line(i, line({"prompt": f"p{i % 37}"})) for i in range(1, 400)]
    entries += [scan_line(i, b"oops\n") for i in range(400, 460)]
    for count in (1, 2, 3, 7):
        owners = [[k for k in range(count) if Shard(k, count).owns(e)] for e in entries]
        assert all(len(o) == 1 for o in owners)
        by_id: dict[str, set[int]] = {}
        for e, o in zip(entries, owners, strict=True):
            if e.id is not None:
                by_id.setdefault(e.id, set()).add(o[0])
        assert all(len(s) == 1 for s in by_id.values())
        if count > 1:
            assert len({o[0] for o in owners}) == count  # not all in one shard
    assert shard_of(Entry(5), 2) == 0 and shard_of(Entry(6), 2) == 1


def test_check_args(tmp_path: Path):
    """The batch command's own mistakes must be caught before torch loads (exit 2, one line)."""
    requests = tmp_path / "r.jsonl"
    requests.write_text("")
    out = tmp_path / "out"
    assert check_args(requests, out, None, None) == Shard()
    assert check_args(requests, out, 2, 3) == Shard(2, 3)
    assert Shard(2, 3).results_name == "results-2-of-3.jsonl" and Shard().results_name == "results.jsonl"
    bad = [
        (tmp_path / "missing.jsonl", out, None, None, "does not exist"),
        (tmp_path, out, None, None, "not a file"),
        (requests, requests, None, None, "not a folder"),
        (requests, requests / "out", None, None, "cannot write"),
        (requests, out, 0, None, "together"),
        (requests, out, None, 2, "together"),
        (requests, out, 2, 2, "within 0..1"),
        (requests, out, -1, 2, "within 0..1"),
        (requests, out, 0, 0, "at least 1"),
    ]
    for req, out_dir, index, count, message in bad:
        with pytest.raises(ValueError, match=message):
            check_args(req, out_dir, index, count)


def test_warmup_shapes_come_from_rank_0s_front(tiny_i2v, tmp_path: Path):
    """A compiled batch warms up with its file's first two distinct valid shapes, found by the front
    (rank 0 alone: validating a line reads its image) and broadcast by the engine. Bad lines are
    passed over. If this fails, every rank decodes every request image again, or the warm-up
    misses the batch's shapes and the first jobs pay for compiling."""
    from tests.conftest import EXAMPLE_IMAGE
    from wan_spmd.batch import BatchFront, BatchSource
    from wan_spmd.config import generation_defaults, inspect_model_folder

    info = inspect_model_folder(tiny_i2v)
    image = str(EXAMPLE_IMAGE)
    requests = tmp_path / "r.jsonl"
    lines = [
        {"prompt": "bad", "image": image, "size": "33x32"},
        {"prompt": "a", "image": image, "size": "32x32", "num_frames": 5},
        {"prompt": "b", "image": image, "size": "32x32", "num_frames": 5},
        {"prompt": "c", "image": image, "size": "64x32", "num_frames": 9},
        {"prompt": "d", "image": image, "size": "64x64", "num_frames": 9},
    ]
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
    source = BatchSource(requests, tmp_path / "out", info=info, defaults=generation_defaults(info), progress=False)
    assert BatchFront(source).warmup_shapes() == ((32, 32, 5), (64, 32, 9))
