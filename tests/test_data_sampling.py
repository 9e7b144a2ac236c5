"""Pre-training sampling (engine/data/sampling.py, engine/data/philox.py): the keyed generator, epoch order and
sharding, resume, and the authors' sampling statistics (negatives, word and region masking, QA labels).

Stores from the synthetic data set with a tiny feature dim (16): 60 images, about 500 sentences.
Statistical checks allow 4 standard deviations (a false alarm about once in 16,000 runs per check; the
draws are keyed, so a given seed either always passes or always fails).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import build_pretrain_stores

from engine.data.philox import philox4x32, random_below, uniforms
from engine.data.sampling import (
    IGNORE,
    MASK_BLANK,
    MASK_KEEP,
    MASK_RANDOM,
    NOT_MASKED,
    BatchPlan,
    PretrainSampler,
    SamplingConfig,
    mask_regions,
    mask_tokens,
    sample_answers,
)
from engine.data.store import RegionStore, TextStore
from lxmert.tokenizer import MASK_ID, VOCAB_SIZE

D = 16


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[TextStore, RegionStore]:
    root = tmp_path_factory.mktemp("sampling")
    text, feats = build_pretrain_stores(root, D, text_splits=("mscoco_train", "mscoco_minival"))
    return TextStore(text), RegionStore(feats)


def sampler(stores: tuple[TextStore, RegionStore], **config) -> PretrainSampler:
    return PretrainSampler(*stores, SamplingConfig(**{"batch_size": 16, **config}))


def epoch_plans(s: PretrainSampler, epoch: int) -> list[BatchPlan]:
    return list(s.iterate(epoch))


def within(count: float, n: int, p: float, sigmas: float = 4.0) -> bool:
    """count successes of n Bernoulli(p) trials within `sigmas` standard deviations of n p."""
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


# -------------------------------------------------------------------------------------- philox


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32-10 (counter words, key words low first, output)."""
    vectors = [
        ((0, 0, 0, 0), (0, 0), "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), "408f276d 41c83b0e a20bc7c6 6d5451fd"),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            "d16cfe09 94fdcceb 5001e420 24126ea1",
        ),
    ]
    for counter, (k0, k1), expected in vectors:
        words = philox4x32(*counter, key=k0 | k1 << 32)
        assert " ".join(f"{int(w):08x}" for w in words) == expected


def test_uniforms_are_keyed_per_element():
    """A column depends on (key, position, epoch, stream, column) only: not on the other positions or count."""
    positions = np.array([5, 0, 1_000_000_007, 3])
    u = uniforms(9, positions, 2, 4, 7)
    assert u.shape == (4, 7) and ((u >= 0) & (u < 1)).all()
    np.testing.assert_array_equal(uniforms(9, positions[2:3], 2, 4, 3), u[2:3, :3])
    assert not np.array_equal(uniforms(9, positions, 3, 4, 7), u)  # epoch
    assert not np.array_equal(uniforms(9, positions, 2, 5, 7), u)  # stream
    assert not np.array_equal(uniforms(10, positions, 2, 4, 7), u)  # key
    big = uniforms(1, np.arange(20000), 0, 1, 2)
    assert abs(big.mean() - 0.5) < 4 * np.sqrt(1 / 12 / big.size)
    k = random_below(big[:, 0], 7)
    assert k.min() == 0 and k.max() == 6
    counts = np.bincount(k, minlength=7)
    assert ((counts - 20000 / 7) ** 2 / (20000 / 7)).sum() < 27.9  # chi-square, 6 dof, p = 1e-4


# ---------------------------------------------------------------------------- order and shards


def test_epoch_order_is_a_permutation_that_changes_with_epoch_and_seed(stores):
    s = sampler(stores, seed=1)
    order = s.epoch_order(0)
    np.testing.assert_array_equal(np.sort(order), np.arange(s.num_samples))
    assert not np.array_equal(order, s.epoch_order(1))
    assert not np.array_equal(order, sampler(stores, seed=2).epoch_order(0))
    np.testing.assert_array_equal(order, sampler(stores, seed=1).epoch_order(0))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_are_disjoint_and_cover_the_epoch(stores, world_size, drop_last):
    n = len(stores[0])
    per_rank = [
        sampler(stores, batch_size=7, world_size=world_size, rank=r, drop_last=drop_last, seed=4)
        for r in range(world_size)
    ]
    steps = len(per_rank[0])
    assert all(len(s) == steps for s in per_rank)  # every rank runs the same number of steps
    g = 7 * world_size
    assert steps == (n // g if drop_last else -(-n // g))
    plans = [s.plan(0, step) for step in range(steps) for s in per_rank]
    positions = np.concatenate([p.positions for p in plans])
    assert positions.size == len(np.unique(positions)) == steps * g  # disjoint, no rank short of samples
    samples = np.concatenate([p.sample_index for p in plans])
    order = per_rank[0].epoch_order(0)
    if drop_last:
        assert len(np.unique(samples)) == samples.size == steps * g > n - g
    else:  # every sample once, then the documented wrap-around: the first (steps g - n) of the order again
        np.testing.assert_array_equal(np.sort(np.unique(samples)), np.arange(n))
        extra = np.sort(positions)[n:]
        np.testing.assert_array_equal(np.sort(samples[np.argsort(positions)][n:]), np.sort(order[extra - n]))


def test_a_samples_draws_do_not_depend_on_batch_size_or_ranks(stores):
    """Keyed by (seed, epoch, position): the same position gets the same sentence, masks and answer."""
    whole = sampler(stores, seed=5).plan_positions(1, np.arange(len(stores[0])))
    for config in (dict(batch_size=16), dict(batch_size=5, world_size=3, rank=2), dict(batch_size=64)):
        s = sampler(stores, seed=5, **config)
        for step in range(len(s)):
            plan = s.plan(1, step)
            keep = plan.positions < len(stores[0])
            p = plan.positions[keep]
            np.testing.assert_array_equal(plan.sentence_index[keep], whole.sentence_index[p])
            np.testing.assert_array_equal(plan.token_action[keep], whole.token_action[p])
            np.testing.assert_array_equal(plan.random_tokens[keep], whole.random_tokens[p])
            np.testing.assert_array_equal(plan.region_action[keep], whole.region_action[p])
            np.testing.assert_array_equal(plan.ans[keep], whole.ans[p])


def test_resume_mid_epoch_repeats_the_same_plans(stores):
    s = sampler(stores, seed=6, bucket_batches=3)
    full = epoch_plans(s, 2)
    resumed = list(sampler(stores, seed=6, bucket_batches=3).iterate(2, start_step=7))  # a fresh process
    assert len(resumed) == len(full) - 7
    for a, b in zip(full[7:], resumed):
        for name in BatchPlan.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_sampler_pickles_small_and_equal(stores):
    s = sampler(stores, seed=7)
    s.epoch_order(0)
    data = pickle.dumps(s)
    assert len(data) < 4096  # stores as paths, no cached order
    again = pickle.loads(data)
    np.testing.assert_array_equal(again.plan(0, 3).token_action, s.plan(0, 3).token_action)


def test_length_bucketing_sorts_within_windows_without_changing_draws(stores):
    plain, bucketed = sampler(stores, seed=8), sampler(stores, seed=8, bucket_batches=4)
    steps, g = len(plain), plain.config.global_batch_size
    for window in range(0, steps, 4):
        stop = min(window + 4, steps)
        expected = np.concatenate([plain.global_positions(0, k) for k in range(window, stop)])
        got = np.concatenate([bucketed.global_positions(0, k) for k in range(window, stop)])
        np.testing.assert_array_equal(np.sort(got), np.sort(expected))  # the same samples in the window
    pad_plain = pad_bucketed = 0
    for step in range(steps):
        a, b = plain.plan(0, step), bucketed.plan(0, step)
        lengths = bucketed.plan_positions(0, bucketed.global_positions(0, step)).lengths
        assert (np.diff(lengths) >= 0).all()  # the global batch is a run of the window sorted by length
        assert (np.diff(b.image_index) >= 0).all()  # a rank's batch is ordered by image
        pad_plain += a.max_length * g - a.lengths.sum()
        pad_bucketed += b.max_length * g - b.lengths.sum()
        same = plain.plan_positions(0, b.positions)  # a sample's draws are its position's, bucketed or not
        np.testing.assert_array_equal(same.token_action, b.token_action)
        np.testing.assert_array_equal(same.sentence_index, b.sentence_index)
    assert pad_bucketed < pad_plain


# ------------------------------------------------------------------------------------ statistics


def test_negatives_half_and_always_another_image(stores):
    text = stores[0]
    s = sampler(stores, seed=9, batch_size=64)
    plans = [p for epoch in range(4) for p in epoch_plans(s, epoch)]
    matched = np.concatenate([p.matched for p in plans])
    assert within((matched == 0).sum(), matched.size, 0.5)
    image_of = text.arrays["image_index"]
    for p in plans:
        neg = p.matched == 0
        np.testing.assert_array_equal(p.sentence_index[~neg], p.sample_index[~neg])  # matched keep their sentence
        np.testing.assert_array_equal(p.image_index, image_of[p.sample_index])  # the sample's own image
        assert (image_of[p.sentence_index[neg]] != p.image_index[neg]).all()
        assert (p.ans[neg] == IGNORE).all()
    assert all((sampler(stores, seed=9, negative_prob=0.0).plan(0, k).matched == 1).all() for k in range(3))


def test_word_masking_rates_and_specials(stores):
    s = sampler(stores, seed=10, batch_size=64)
    plans = [p for epoch in range(6) for p in epoch_plans(s, epoch)]
    slots = np.arange(s.max_length)
    wordpiece = np.concatenate([(slots >= 1) & (slots < p.lengths[:, None] - 1) for p in plans])
    action = np.concatenate([p.token_action for p in plans])
    assert (action[~wordpiece] == NOT_MASKED).all()  # [CLS], [SEP] and padding are never masked
    masked = action[wordpiece] != NOT_MASKED
    assert within(masked.sum(), wordpiece.sum(), 0.15)
    kinds = action[wordpiece][masked]
    for kind, p in ((MASK_BLANK, 0.8), (MASK_RANDOM, 0.1), (MASK_KEEP, 0.1)):
        assert within((kinds == kind).sum(), kinds.size, p), kind
    random_ids = np.concatenate([p.random_tokens[p.token_action == MASK_RANDOM] for p in plans]).astype(np.int64)
    assert random_ids.min() >= 0 and random_ids.max() < VOCAB_SIZE  # uniform over the whole vocabulary
    assert abs(random_ids.mean() - (VOCAB_SIZE - 1) / 2) < 4 * VOCAB_SIZE / np.sqrt(12 * random_ids.size)


def test_region_masking_rates_and_sources(stores):
    text, regions = stores
    s = sampler(stores, seed=11, batch_size=64)
    plans = [p for epoch in range(3) for p in epoch_plans(s, epoch)]
    action = np.concatenate([p.region_action for p in plans])
    masked = action != NOT_MASKED
    assert within(masked.sum(), action.size, 0.15)  # every region is real in obj36 data
    for kind, p in ((MASK_BLANK, 0.8), (MASK_RANDOM, 0.1), (MASK_KEEP, 0.1)):
        assert within((action[masked] == kind).sum(), masked.sum(), p), kind
    for p in plans:
        np.testing.assert_array_equal(p.blank_at, np.flatnonzero(p.region_action == MASK_BLANK))
        b, r = np.divmod(p.replace_at, s.num_regions)
        assert (p.region_action[b, r] == MASK_RANDOM).all() and len(b) == (p.region_action == MASK_RANDOM).sum()
        assert (p.replace_region < regions.arrays["num_boxes"][p.replace_image]).all()
    sources = np.concatenate([p.replace_image for p in plans])
    assert len(np.unique(sources)) > len(regions) // 2  # random images from all over the store


def test_answers_drawn_in_proportion_to_scores():
    offsets = np.array([0, 3, 3, 4, 6])  # row 0: three answers; row 1: none; row 2: one; row 3: zero scores
    ids = np.array([5, 7, 9, 11, 2, 4], dtype=np.int16)
    scores = np.array([1.0, 0.3, 0.7, 0.6, 0.0, 0.0], dtype=np.float32)
    n = 30000
    u = uniforms(3, np.arange(n), 0, 2, 1)[:, 0]
    picks = sample_answers(offsets, ids, scores, np.zeros(n, dtype=np.int64), u)
    counts = np.array([(picks == a).sum() for a in (5, 7, 9)])
    assert counts.sum() == n
    expected = n * np.array([1.0, 0.3, 0.7]) / 2.0
    assert ((counts - expected) ** 2 / expected).sum() < 18.4  # chi-square, 2 dof, p = 1e-4
    rows = np.array([1, 2, 3, 0])
    np.testing.assert_array_equal(sample_answers(offsets, ids, scores, rows, np.full(4, 0.99)), [IGNORE, 11, 2, 9])


def test_plan_answers_follow_the_labels(stores):
    text = stores[0]
    s = sampler(stores, seed=12, batch_size=64)
    seen_labelled = 0
    for p in epoch_plans(s, 0):
        for i, row in enumerate(p.sample_index):
            labels = text.labels_of(int(row))
            if p.matched[i] and labels:
                assert int(p.ans[i]) in labels
                seen_labelled += 1
            else:
                assert p.ans[i] == IGNORE
    assert seen_labelled > 50


# ---------------------------------------------------------------------------- applying decisions


def test_mask_functions_agree_on_numpy_and_torch():
    import torch

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 30000, (4, 6)).astype(np.int16)
    action = rng.integers(0, 4, (4, 6)).astype(np.int8)
    random_ids = rng.integers(0, 30000, (4, 6)).astype(np.int16)
    inputs, labels = mask_tokens(tokens, action, random_ids)
    t_inputs, t_labels = mask_tokens(*(torch.from_numpy(a) for a in (tokens, action, random_ids)))
    np.testing.assert_array_equal(t_inputs.numpy(), inputs)
    np.testing.assert_array_equal(t_labels.numpy(), labels)
    assert inputs.dtype == labels.dtype == np.int16
    np.testing.assert_array_equal(inputs[action == MASK_BLANK], MASK_ID)
    np.testing.assert_array_equal(inputs[action == MASK_RANDOM], random_ids[action == MASK_RANDOM])
    np.testing.assert_array_equal(inputs[action % 3 == 0], tokens[action % 3 == 0])  # not masked, kept
    np.testing.assert_array_equal(labels, np.where(action != 0, tokens, -1))

    feats = rng.standard_normal((3, 5, 2)).astype(np.float16)
    r_action = rng.integers(0, 4, (3, 5)).astype(np.int8)
    blank_at, replace_at = np.flatnonzero(r_action == MASK_BLANK), np.flatnonzero(r_action == MASK_RANDOM)
    replacement = rng.standard_normal((replace_at.size, 2)).astype(np.float16)
    arrays = (feats, r_action, blank_at, replace_at, replacement)
    masked, mask = mask_regions(*arrays)
    t_masked, t_mask = mask_regions(*(torch.from_numpy(a) for a in arrays))
    np.testing.assert_array_equal(t_masked.numpy(), masked)
    np.testing.assert_array_equal(t_mask.numpy(), mask)
    assert masked.dtype == mask.dtype == np.float16
    np.testing.assert_array_equal(masked[r_action == MASK_BLANK], 0)
    np.testing.assert_array_equal(masked.reshape(-1, 2)[replace_at], replacement)
    keep = (r_action == NOT_MASKED) | (r_action == MASK_KEEP)
    np.testing.assert_array_equal(masked[keep], feats[keep])
    np.testing.assert_array_equal(mask, (r_action != 0).astype(np.float16))


def test_sources_restrict_samples_negatives_and_random_regions(stores):
    text = stores[0]
    source_of = text.arrays["source_id"]
    chosen = [text.sources.index("mscoco"), text.sources.index("vqa")]
    allowed = np.isin(np.arange(len(text)), np.flatnonzero(np.isin(source_of, chosen)))
    s = sampler(stores, seed=13, sources=("mscoco", "vqa"), batch_size=32)
    assert s.num_samples == allowed.sum() < len(text)
    plans = epoch_plans(s, 0)
    samples = np.concatenate([p.sample_index for p in plans])
    np.testing.assert_array_equal(np.unique(samples), np.flatnonzero(allowed))  # each chosen sentence, no other
    assert allowed[np.concatenate([p.sentence_index for p in plans])].all()  # negatives from them too
    images_of_chosen = np.unique(text.arrays["image_index"][allowed])
    assert np.isin(np.concatenate([p.replace_image for p in plans]), images_of_chosen).all()
    with pytest.raises(ValueError, match="not in"):
        sampler(stores, sources=("nocaps",))


def test_config_and_store_checks(stores):
    with pytest.raises(ValueError):
        SamplingConfig(rank=2, world_size=2)
    with pytest.raises(ValueError):
        SamplingConfig(word_mask_prob=1.5)
    with pytest.raises(ValueError, match="no global batch"):
        sampler(stores, batch_size=len(stores[0]) + 1, drop_last=True)
    with pytest.raises(IndexError):
        sampler(stores).positions(0, 10_000)
