"""The pre-training loaders (engine/data/loaders.py) and their batch (engine/data/batch.py): exact round trips
against the stores, the torch DataLoader and the device-resident loader agreeing bit for bit (on CPU),
determinism over workers and seeds, resume through state_dict, padded regions, and the model taking a batch.

Stores from the synthetic data set with a tiny feature dim (16); the GPU-resident loader's device is the CPU.
"""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import lxmert
from engine.data import convert, synthetic
from engine.data.batch import MODEL_FIELDS, PretrainBatch
from engine.data.loaders import GpuResidentLoader, PretrainLoader, TorchLoader, make_loader
from engine.data.sampling import MASK_BLANK, MASK_KEEP, NOT_MASKED, SamplingConfig
from engine.data.store import RegionStore, TextStore
from lxmert.tokenizer import CLS_ID, MASK_ID, SEP_ID

D = 16


def build(root: Path, images: int, regions: int = 36) -> tuple[Path, Path]:
    """Synthetic data -> (text store, region store); `regions` < 36 leaves padding regions in every image."""
    synthetic.generate(
        root / "syn", images, feat_dim=D, seed=2, regions=regions, captions_per_image=3, questions_per_image=2
    )
    tsvs = [root / "syn/mscoco_imgfeat/train2014_obj36.tsv", root / "syn/mscoco_imgfeat/val2014_obj36.tsv"]
    convert.convert_features(tsvs, root / "feats", feat_dim=D, progress=False)
    texts = [root / "syn/lxmert/mscoco_train.json", root / "syn/lxmert/mscoco_minival.json"]
    convert.convert_text(texts, root / "feats", root / "text", answers=root / "syn/lxmert/all_ans.json", progress=False)
    return root / "text", root / "feats"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[TextStore, RegionStore]:
    text, feats = build(tmp_path_factory.mktemp("loaders"), 40)
    return TextStore(text), RegionStore(feats)


def loader(kind: str, stores, **options) -> PretrainLoader:
    config = {"batch_size": 16, "seed": 0}
    config.update({k: options.pop(k) for k in list(options) if k in SamplingConfig.__dataclass_fields__})
    return make_loader(kind, *stores, SamplingConfig(**config), **options)


def epoch(ld: PretrainLoader, number: int = 0) -> list[PretrainBatch]:
    ld.set_epoch(number)
    return list(ld)


def assert_same(a: list[PretrainBatch], b: list[PretrainBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.equal(y), f"batches of step {x.step} / {y.step} differ"


# ------------------------------------------------------------------------------------ round trip


def test_batches_round_trip_to_the_stores(stores):
    text, regions = stores
    ld = loader("torch", stores, seed=3)
    r = regions.arrays
    masked_tokens = masked_regions = 0
    for batch in epoch(ld):
        plan = ld.sampler.plan(batch.epoch, batch.step)
        img, sent = batch.image_index, batch.sentence_index
        np.testing.assert_array_equal(img, plan.image_index)
        feat_target, feat_mask = (t.numpy() for t in batch.obj_labels["feat"])
        np.testing.assert_array_equal(feat_target, r["features"][img].astype(np.float32))  # fp16 -> fp32 exactly
        np.testing.assert_array_equal(batch.visual_pos.numpy(), r["boxes"][img])
        for name, key in (("obj", "obj"), ("attr", "attr")):
            ids, conf = (t.numpy() for t in batch.obj_labels[name])
            np.testing.assert_array_equal(ids, r[f"{key}_ids"][img])
            np.testing.assert_array_equal(conf, r[f"{key}_conf"][img].astype(np.float32))
        feats = batch.visual_feats.numpy()
        action = plan.region_action
        unchanged = (action == NOT_MASKED) | (action == MASK_KEEP)
        np.testing.assert_array_equal(feats[unchanged], feat_target[unchanged])
        np.testing.assert_array_equal(feats[action == MASK_BLANK], 0)
        sources = r["features"][plan.replace_image, plan.replace_region].astype(np.float32)
        np.testing.assert_array_equal(feats.reshape(-1, D)[plan.replace_at], sources)
        np.testing.assert_array_equal(feat_mask, (action != NOT_MASKED).astype(np.float32))
        masked_regions += int(feat_mask.sum())

        lengths = text.arrays["lengths"][sent].astype(np.int64)
        length = int(lengths.max())  # dynamic padding: the longest sentence of this batch
        assert batch.input_ids.shape == (len(img), length) and length <= text.max_length
        tokens = text.arrays["token_ids"][sent][:, :length].astype(np.int64)
        assert (text.arrays["token_ids"][sent][:, length:] == 0).all()
        ids, labels = batch.input_ids.numpy(), batch.labels.numpy()
        np.testing.assert_array_equal(batch.attention_mask.numpy(), np.arange(length) < lengths[:, None])
        np.testing.assert_array_equal(ids[labels < 0], tokens[labels < 0])
        np.testing.assert_array_equal(labels[labels >= 0], tokens[labels >= 0])
        np.testing.assert_array_equal(ids[plan.token_action[:, :length] == MASK_BLANK], MASK_ID)
        assert (ids[:, 0] == CLS_ID).all() and (ids[np.arange(len(ids)), lengths - 1] == SEP_ID).all()
        assert (labels[:, 0] < 0).all() and (labels[np.arange(len(ids)), lengths - 1] < 0).all()
        assert (labels[np.arange(length) >= lengths[:, None] - 1] == -1).all()  # [SEP] and padding
        assert (batch.token_type_ids == 0).all() and batch.visual_attention_mask is None
        masked_tokens += int((labels >= 0).sum())
    assert masked_tokens > 50 and masked_regions > 500


def test_dtypes_compact_on_host_wide_after_to(stores):
    ld = loader("torch", stores)
    host = ld.dataloader.dataset[(0, 0)]
    assert host.input_ids.dtype == host.labels.dtype == torch.int16
    assert host.visual_feats.dtype == host.obj_labels["feat"][0].dtype == torch.float16
    assert host.attention_mask.dtype == torch.uint8 and host.ans.dtype == torch.int16
    wide = host.to("cpu")
    assert wide.input_ids.dtype == wide.labels.dtype == wide.ans.dtype == wide.matched_label.dtype == torch.int64
    floats = (wide.visual_feats, wide.obj_labels["feat"][0], wide.obj_labels["feat"][1], wide.obj_labels["obj"][1])
    assert all(t.dtype == torch.float32 for t in floats)
    assert wide.obj_labels["obj"][0].dtype == torch.int64
    assert wide.equal(next(iter(ld)))  # what the loader yields on device "cpu"
    assert host.visual_feats.to(torch.float32).equal(wide.visual_feats)
    inputs = wide.model_inputs()
    assert set(inputs) <= set(MODEL_FIELDS) and "visual_attention_mask" not in inputs and "epoch" not in inputs


# ---------------------------------------------------------------------------- the loaders agree


def test_torch_and_device_loaders_yield_identical_batches(stores):
    assert_same(epoch(loader("torch", stores, seed=5), 1), epoch(loader("gpu", stores, seed=5), 1))


def test_loaders_agree_with_ranks_bucketing_and_no_prefetch(stores):
    options = dict(seed=6, batch_size=8, world_size=3, rank=1, bucket_batches=3, drop_last=True)
    torch_batches = epoch(loader("torch", stores, **options), 2)
    assert_same(torch_batches, epoch(loader("gpu", stores, prefetch=0, **options), 2))
    assert_same(torch_batches, epoch(loader("gpu", stores, prefetch=5, **options), 2))


@pytest.mark.slow
def test_worker_count_does_not_change_batches(stores):
    ld = loader("torch", stores, seed=7, num_workers=2)
    assert_same(epoch(loader("torch", stores, seed=7)), epoch(ld))
    ld.set_epoch(1)
    for _ in zip(range(3), ld):  # abandoned mid-epoch, with batches in flight
        pass
    assert_same(epoch(loader("torch", stores, seed=7), 1), epoch(ld, 1))  # persistent workers see the new pass


def test_seeds_and_epochs_differ(stores):
    a, b = loader("torch", stores, seed=8), loader("torch", stores, seed=9)
    first = next(iter(a))
    assert not first.equal(next(iter(b)))
    assert first.equal(next(iter(loader("gpu", stores, seed=8))))
    a.set_epoch(1)
    assert not np.array_equal(next(iter(a)).sample_index, first.sample_index)


def test_loader_pickles_stores_as_paths(stores):
    ld = loader("torch", stores)
    assert len(pickle.dumps(ld.dataloader.dataset)) < 4096  # what a worker receives: no arrays


# --------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("kind", ["torch", "gpu"])
def test_resume_mid_epoch_from_state_dict(stores, kind):
    options = dict(seed=10, bucket_batches=2)
    full = epoch(loader(kind, stores, **options), 3)
    ld = loader(kind, stores, **options)
    ld.set_epoch(3)
    for k, _ in enumerate(ld):
        if k == 4:
            break
    state = ld.state_dict()
    assert state["epoch"] == 3 and state["step"] == 5  # five batches consumed

    again = loader(kind, stores, **options)  # a new process
    again.load_state_dict(state)
    again.set_epoch(3)  # the training loop's call keeps the loaded position
    rest = list(again)
    assert_same(full[5:], rest)
    assert again.state_dict()["step"] == len(again)
    again.set_epoch(4)
    assert next(iter(again)).equal(next(iter(_at(kind, stores, 4, **options))))  # the next epoch from its start


def _at(kind: str, stores, number: int, **options) -> PretrainLoader:
    ld = loader(kind, stores, **options)
    ld.set_epoch(number)
    return ld


def test_state_from_another_order_is_refused(stores):
    state = loader("torch", stores, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        loader("torch", stores, seed=2).load_state_dict(state)
    two_ranks = loader("torch", stores, seed=1, batch_size=8, world_size=2, rank=1)
    two_ranks.load_state_dict(state)  # the same global batch on another world size: accepted


def test_a_position_resumes_with_another_micro_batch_times_ranks(stores):
    """Elastic resume: 2 ranks x micro 4 after 3 steps are 24 samples in; one rank x micro 4 goes on from step 6,
    with the samples rank 0 of the two would have had next (the same draws: they are keyed by position)."""
    rank0 = loader("torch", stores, seed=1, batch_size=4, world_size=2, rank=0)
    rank0.set_epoch(0)
    batches = iter(rank0)
    for _ in range(3):
        next(batches)
    state = rank0.state_dict()
    expected = next(batches)
    one = loader("torch", stores, seed=1, batch_size=4)
    one.load_state_dict(state)
    one.set_epoch(0)
    assert one.step == 6
    got = next(iter(one))
    assert np.array_equal(got.sample_index, expected.sample_index) and got.input_ids.equal(expected.input_ids)
    with pytest.raises(ValueError, match="no whole number of steps of 16"):
        loader("torch", stores, seed=1).load_state_dict({**state, "step": 1})
    with pytest.raises(ValueError, match="global_batch_size"):  # length buckets depend on the global batch
        loader("torch", stores, seed=1, batch_size=4, bucket_batches=2).load_state_dict(
            loader("torch", stores, seed=1, batch_size=8, bucket_batches=2).state_dict()
        )


def test_kinds():
    with pytest.raises(ValueError, match="unknown loader kind"):
        make_loader("tf", None, None, SamplingConfig())  # type: ignore[arg-type]


def test_make_loader_kinds_from_paths(stores):
    text, regions = stores
    assert isinstance(make_loader("torch", text.path, regions.path, SamplingConfig(batch_size=4)), TorchLoader)
    device = make_loader("gpu", text.path, regions.path, SamplingConfig(batch_size=4))
    assert isinstance(device, GpuResidentLoader) and device.table.nbytes > regions.arrays["features"].nbytes


# ----------------------------------------------------------------------------- padding regions


def test_padding_regions_are_never_masked_and_hidden_from_attention(tmp_path):
    text, feats = build(tmp_path, 8, regions=30)
    stores = TextStore(text), RegionStore(feats)
    torch_batches = epoch(loader("torch", stores, seed=11, batch_size=8))
    assert_same(torch_batches, epoch(loader("gpu", stores, seed=11, batch_size=8)))
    for batch in torch_batches:
        real = torch.arange(36) < 30
        assert batch.visual_attention_mask is not None
        assert (batch.visual_attention_mask == real.long()).all()
        ids, conf = batch.obj_labels["obj"]
        assert (ids[:, ~real] == -1).all() and (conf[:, ~real] == 0).all()
        assert (batch.obj_labels["feat"][1][:, ~real] == 0).all()
        assert (batch.visual_feats[:, ~real] == 0).all()
        assert "visual_attention_mask" in batch.model_inputs()


# ------------------------------------------------------------------------------------ the model


def test_batch_fields_are_the_models_keywords():
    keywords = inspect.signature(lxmert.LxmertForPreTraining.forward).parameters
    assert all(name in keywords for name in MODEL_FIELDS)


def test_the_model_takes_a_batch(stores):
    text, _ = stores
    config = lxmert.LxmertConfig(
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=37,
        l_layers=1,
        r_layers=1,
        x_layers=1,
        visual_feat_dim=D,
        num_qa_labels=len(text.answers),
        num_object_labels=len(synthetic.OBJECT_NAMES),
        num_attr_labels=len(synthetic.ATTRIBUTE_NAMES),
    )
    torch.manual_seed(0)
    model = lxmert.LxmertForPreTraining(config)
    batch = next(b for b in loader("gpu", stores, seed=12) if (b.ans >= 0).any() and (b.labels >= 0).any())
    out = model(**batch.model_inputs())
    assert set(out.losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    assert all(torch.isfinite(v) and v > 0 for v in out.losses.values())
    assert torch.isfinite(out.loss)
    out.loss.backward()
