"""The parallel layout spec: checked before torch loads, with the numbers in the error."""

from __future__ import annotations

import re

import pytest

from wan_spmd.config import REAL_MODELS
from wan_spmd.launch import (
    ParallelLayout,
    check_hosts,
    check_layout,
    parse_warmup_shapes,
    preset_warmup_shape,
    resolve_layout,
)

A14B = REAL_MODELS["wan2.2-i2v-a14b"].transformer_config


def test_tp_defaults_to_what_the_world_leaves():
    """Plain `torchrun --nproc-per-node N` stays tensor parallelism over all N ranks."""
    assert resolve_layout(1) == ParallelLayout(tp=1)
    assert resolve_layout(4) == ParallelLayout(tp=4)
    assert resolve_layout(4, ulysses=2) == ParallelLayout(tp=2, ulysses=2)
    assert resolve_layout(4, cfg_parallel=True) == ParallelLayout(tp=2, cfg=2)
    assert resolve_layout(8, ulysses=2, cfg_parallel=True).mesh_shape == (2, 2, 2)


@pytest.mark.parametrize(
    "world, kwargs, message",
    [
        (4, {"tp": 3}, "cfg=1 x ulysses=1 x tp=3 = 3 ranks, but the world size is 4"),
        (3, {"cfg_parallel": True}, "world size 3 does not split into cfg=2 x ulysses=1 groups"),
        (2, {"tp": 0}, "--tp must be >= 1, got 0"),
        (2, {"ulysses": 0}, "--ulysses must be >= 1, got 0"),
    ],
)
def test_impossible_products_are_refused(world, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_layout(world, **kwargs)


def test_heads_and_ffn_must_split():
    check_layout(ParallelLayout(tp=2), A14B)
    with pytest.raises(ValueError, match="40 attention heads do not split over tp=3"):
        check_layout(ParallelLayout(tp=3), A14B)
    with pytest.raises(ValueError, match="ffn_dim 13824 does not split over tp=5"):
        check_layout(ParallelLayout(tp=5), {**A14B, "num_attention_heads": 40 * 5})
    with pytest.raises(ValueError, match=r"5 attention heads per tp rank \(40 over tp=8\) do not split over ulysses=2"):
        check_layout(ParallelLayout(tp=8, ulysses=2), A14B)


def test_warmup_shapes_parse_and_refuse_with_the_numbers():
    """--warmup-shapes: what a server warms before /health says ready; bad items named, deduplicated."""
    assert parse_warmup_shapes("1280x720x81, 832x480x81,1280x720x81", 16) == ((1280, 720, 81), (832, 480, 81))
    assert parse_warmup_shapes("none", 16) == ()
    for text, message in (
        ("1280x720", "is not WIDTHxHEIGHTxFRAMES"),
        ("²x720x81", "is not WIDTHxHEIGHTxFRAMES"),
        ("1280x704x80", "80 frames in '1280x704x80' is not 4k+1 within 161"),
        ("1280x720x81", "height 720 in '1280x720x81' is not a multiple of 32"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_warmup_shapes(text, 32)


def test_preset_shape_is_what_a_bare_request_gets():
    assert preset_warmup_shape({"max_area": "1280x720", "num_frames": 81}) == (1280, 720, 81)
    assert preset_warmup_shape({"size": "832x480", "num_frames": 81}) == (832, 480, 81)
    assert preset_warmup_shape({}) is None


def test_only_the_cfg_dimension_crosses_hosts():
    """Issue 21: a tp or ulysses group spanning hosts would run its per-layer collectives over the
    network; refused with the numbers. cfg groups may sit on different hosts."""
    check_hosts(ParallelLayout(tp=1, cfg=2), ranks_per_host=1)
    check_hosts(ParallelLayout(tp=8, cfg=2), ranks_per_host=8)
    check_hosts(ParallelLayout(tp=4), ranks_per_host=4)
    with pytest.raises(ValueError, match=r"tp=2 x ulysses=1 = 2 ranks per group would span hosts of 1 rank\(s\)"):
        check_hosts(ParallelLayout(tp=2), ranks_per_host=1)
    with pytest.raises(ValueError, match="only the cfg dimension may cross hosts"):
        check_hosts(ParallelLayout(tp=4, ulysses=2, cfg=2), ranks_per_host=4)


def test_ulysses_is_refused_for_per_token_timesteps():
    """TI2V's per-token modulation is not cut by the Ulysses split yet: refused before loading, not
    run wrong."""
    from wan_spmd.families import FAMILIES
    from wan_spmd.launch import check_family

    check_family(ParallelLayout(tp=2, cfg=2), FAMILIES["wan2.2-ti2v-5b"])
    check_family(ParallelLayout(ulysses=2), FAMILIES["wan2.2-i2v-a14b"])
    with pytest.raises(ValueError, match="--ulysses 2 is not supported for wan2.2-ti2v-5b"):
        check_family(ParallelLayout(ulysses=2), FAMILIES["wan2.2-ti2v-5b"])
