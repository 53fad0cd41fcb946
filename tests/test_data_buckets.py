"""Bucket choice (the pipeline's size under an upscale limit) and the resize + crop geometry, on cases small enough
to work out by hand."""

import numpy as np
import pytest
from PIL import Image

from qwen_image_lora import model as qmodel
from qwen_image_lora.data.buckets import (
    BucketBatchSampler,
    Transform,
    assign_bucket,
    histogram,
    plan_transform,
    short_batches,
    stable_int,
)


def test_assign_bucket_is_the_pipelines_size_shrunk_to_the_upscale_limit():
    for w, h in [(100, 100), (300, 100), (100, 300), (1920, 1080)]:
        assert assign_bucket(w, h, 64, max_upscale=10) == qmodel.fit_size(w, h, 64)
    assert qmodel.fit_size(60, 20, 64) == (96, 32)
    # 96x32 would need 96/60 = 1.6x: shrunk by 1.5/1.6 to 90x30 -> floors to 64x32 (never below 32).
    assert assign_bucket(60, 20, 64, max_upscale=1.5) == (64, 32)
    assert assign_bucket(60, 20, 64, max_upscale=1.6) == (96, 32)
    assert assign_bucket(150, 50, 64) == (96, 32)  # a downscale is always allowed
    assert assign_bucket(60, 20, 64) == (32, 32)  # by default no upscale: 96x32 x 0.625 = 60x20 -> 32x32
    assert assign_bucket(100, 100, 128) == (96, 96)  # 128 x 100/128 = 100 -> 96 on both sides


def test_plan_transform_covers_the_bucket_and_centres_the_crop():
    t = plan_transform((200, 100), (64, 64))  # scale 0.64: 128x64, crop 32 px off the left
    assert t == Transform((128, 64), 32, 0, (64, 64))
    t = plan_transform((100, 300), (64, 64))  # scale 0.64: 64x192
    assert t == Transform((64, 192), 0, 64, (64, 64))
    t = plan_transform((63, 64), (64, 64))  # scale 64/63: 64x65, the odd pixel cut from the bottom
    assert t == Transform((64, 65), 0, 0, (64, 64))
    t = plan_transform((60, 64), (64, 64))  # 64x68: 2 px off the top
    assert t == Transform((64, 68), 0, 2, (64, 64))
    t = plan_transform((129, 64), (64, 64))  # 65 px to cut: 32 left, 33 right, in whole pixels
    assert t.left == 32 and type(t.left) is int


def test_random_crop_is_seeded_and_stays_inside():
    a = [plan_transform((400, 100), (64, 64), crop="random", seed=s) for s in range(20)]
    assert a == [plan_transform((400, 100), (64, 64), crop="random", seed=s) for s in range(20)]
    assert len({t.left for t in a}) > 5 and all(0 <= t.left <= 256 - 64 and t.top == 0 for t in a)
    assert plan_transform((400, 100), (64, 64), crop="random") == a[0]  # seed 0 by default
    assert {plan_transform((65, 64), (64, 64), crop="random", seed=s).left for s in range(20)} == {0, 1}


def test_transform_apply_crops_the_planned_box():
    image = Image.fromarray(np.arange(128 * 64 * 3, dtype=np.uint32).reshape(64, 128, 3).astype(np.uint8))
    out = Transform((128, 64), 32, 0, (64, 64)).apply(image)  # no resize: the same pixels, shifted
    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out), np.asarray(image)[:, 32:96])
    resized = Transform((64, 32), 0, 0, (64, 32)).apply(image)  # resized first, with Lanczos
    assert np.array_equal(np.asarray(resized), np.asarray(image.resize((64, 32), Image.Resampling.LANCZOS)))


def test_histogram_lists_most_used_first():
    text = histogram([(64, 64), (96, 32), (64, 64)])
    lines = text.splitlines()
    assert lines[0].split() == ["64x64", "2", "#" * 40]
    assert lines[1].split() == ["96x32", "1", "#" * 20]
    rare = histogram([(64, 64)] * 40 + [(96, 32)]).splitlines()[1]
    assert rare.split() == ["96x32", "1", "#"]  # 40 * 1/40 = 1 bar
    with pytest.raises(ValueError):
        histogram([])


def test_sampler_is_seeded_homogeneous_sharded_and_resumable():
    groups = [[0, 1, 2, 3, 4], [5, 6, 7], [8]]
    a = BucketBatchSampler(groups, batch_size=2, seed=1)
    first = [b for _, b in zip(range(12), iter(a))]
    assert first == [b for _, b in zip(range(12), iter(BucketBatchSampler(groups, 2, 1)))]
    for batch in first:
        assert len({next(g for g, members in enumerate(groups) if i in members) for i, _, _ in batch}) == 1
    # resume from the cursor of batch 5: the rest is identical
    b = BucketBatchSampler(groups, 2, 1)
    b.load_state_dict({"epoch": first[5][0][1], "position": first[5][0][2] + 1})
    assert [x for _, x in zip(range(6), iter(b))] == first[6:12]
    # two ranks: same number of steps, disjoint batches within an epoch, cover everything
    r0, r1 = BucketBatchSampler(groups, 2, 1, 2, 0), BucketBatchSampler(groups, 2, 1, 2, 1)
    assert r0.steps_per_epoch() == r1.steps_per_epoch()
    seen = {i for s in (r0, r1) for batch in s.batches_for_epoch(0) for i in batch}
    assert seen == set(range(9))


def test_sampler_epochs_cover_every_item_once_in_a_seeded_order_and_continue_across_epochs():
    groups = [[0, 1, 2, 3, 4], [5, 6, 7], [8]]
    fresh = BucketBatchSampler(groups, 2, seed=1)
    assert fresh.state_dict() == {"epoch": 0, "position": 0}
    epoch0, epoch1 = fresh.batches_for_epoch(0), fresh.batches_for_epoch(1)
    for batches in (epoch0, epoch1):  # one process: each item exactly once per epoch, in batches of <= 2
        assert sorted(i for b in batches for i in b) == list(range(9)) and all(len(b) <= 2 for b in batches)
    assert epoch0 != epoch1, "every epoch reshuffles"
    assert epoch0 != BucketBatchSampler(groups, 2, seed=2).batches_for_epoch(0), "the seed decides the order"
    # Iteration runs epoch 0 from its first batch, then epoch 1, with the cursor each batch was drawn at.
    drawn = [batch for _, batch in zip(range(len(epoch0) + len(epoch1)), iter(fresh))]
    assert [[i for i, _, _ in b] for b in drawn] == epoch0 + epoch1
    assert [(b[0][1], b[0][2]) for b in drawn] == [(0, p) for p in range(len(epoch0))] + [
        (1, p) for p in range(len(epoch1))
    ]
    assert fresh.state_dict() == {"epoch": 1, "position": len(epoch1)}
    # The order is part of the resume contract (a checkpoint stores only the cursor): a version that changed it would
    # resume an older run into a different order, repeating some items and skipping others.
    assert epoch0 == [[4, 1], [3], [8], [7, 5], [6], [0, 2]]


def test_sampler_ranks_get_equal_step_counts_for_any_number_of_processes():
    groups = [[0, 1, 2, 3], [4, 5, 6], [7]]  # 5 batches of <= 2: uneven for 2, 3 and 4 processes
    for replicas in (2, 3, 4):
        ranks = [BucketBatchSampler(groups, 2, 1, replicas, r).batches_for_epoch(0) for r in range(replicas)]
        assert len({len(r) for r in ranks}) == 1, replicas
        assert {i for r in ranks for b in r for i in b} == set(range(8))


def test_stable_int_depends_on_every_part():
    assert stable_int(1, "epoch", 0) == stable_int(1, "epoch", 0)
    assert len({stable_int(1, "epoch", 0), stable_int(2, "epoch", 0), stable_int(1, "epoch", 1), stable_int(1, 0)}) == 4


@pytest.mark.parametrize("sizes, batch_size, expected", [
    ([9, 1, 1], 4, (3, 5)),  # 4, 4, 1 | 1 | 1: three batches at a quarter of the size
    ([11], 4, (0, 3)),  # 4, 4, 3: the last is three quarters full
    ([10], 4, (1, 3)),  # 4, 4, 2: exactly half is short
    ([8, 3], 4, (0, 3)),  # full, and three of four
    ([12], 4, (0, 3)),
    ([5, 5], 1, (0, 10)),  # batch 1 is never short
    ([1, 1, 7], 2, (3, 6)),
])  # fmt: skip
def test_short_batches_counts_the_batches_a_small_bucket_leaves_at_most_half_full(sizes, batch_size, expected):
    assert short_batches(sizes, batch_size) == expected
    total = len(BucketBatchSampler([list(range(n)) for n in sizes], batch_size, seed=0).batches_for_epoch(0))
    assert total == expected[1]  # the sampler cuts each bucket as counted
