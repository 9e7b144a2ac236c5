"""The DALI loader (engine/data/dali.py) against the torch loader: the same batches bit for bit for the same
seed (ranks, drop_last both ways, bucketing), resume through state_dict, no drift across epoch boundaries, and
the region rows really read by DALI. CPU pipelines (device_id=None); skipped where DALI does not import.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from test_data_loaders import assert_same, build, epoch  # noqa: E402

from engine.data.dali import DaliLoader, import_dali  # noqa: E402
from engine.data.loaders import PretrainLoader, make_loader  # noqa: E402
from engine.data.sampling import SamplingConfig  # noqa: E402
from engine.data.store import RegionStore, TextStore  # noqa: E402


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[TextStore, RegionStore]:
    text, feats = build(tmp_path_factory.mktemp("dali"), 30, regions=33)  # padding regions in every image
    return TextStore(text), RegionStore(feats)


def loader(kind: str, stores, **options) -> PretrainLoader:
    config = {"batch_size": 8, "seed": 0}
    config.update({k: options.pop(k) for k in list(options) if k in SamplingConfig.__dataclass_fields__})
    return make_loader(kind, *stores, SamplingConfig(**config), **options)


@pytest.mark.parametrize("drop_last", [False, True])
def test_dali_equals_torch_on_two_ranks(stores, drop_last):
    for rank in (0, 1):
        options = dict(seed=4, batch_size=6, world_size=2, rank=rank, drop_last=drop_last)
        dali = loader("dali", stores, num_workers=2, **options)
        assert isinstance(dali, DaliLoader)
        expected = epoch(loader("torch", stores, **options), 1)
        assert len(expected) >= 3
        assert_same(expected, epoch(dali, 1))
        assert dali.pipeline_runs == len(expected)  # every batch came out of a DALI pipeline run


def test_dali_equals_gpu_loader_with_bucketing(stores):
    options = dict(seed=5, batch_size=7, bucket_batches=3)
    assert_same(epoch(loader("gpu", stores, **options), 2), epoch(loader("dali", stores, prefetch=1, **options), 2))


def test_epoch_boundaries_do_not_drift(stores):
    """Several epochs on one loader: each one the torch loader's, every sample once (plus the wrap-around)."""
    dali, reference = loader("dali", stores, seed=6), loader("torch", stores, seed=6)
    samples = len(dali.sampler.text)
    for number in range(3):
        batches = epoch(dali, number)
        assert_same(epoch(reference, number), batches)
        seen = np.concatenate([b.sample_index for b in batches])
        assert len(seen) == len(batches) * 8 == -(-samples // 8) * 8
        assert set(seen.tolist()) == set(range(samples))
    assert dali.pipelines_built == 3  # one pipeline a pass, its length set by the plan


def test_resume_mid_epoch_and_abandoned_pass(stores):
    full = epoch(loader("torch", stores, seed=7), 1)
    dali = loader("dali", stores, seed=7)
    dali.set_epoch(1)
    for _, _ in zip(range(3), dali):  # abandoned with batches in flight
        pass
    state = dali.state_dict()
    assert state["step"] == 3
    resumed = loader("dali", stores, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # keeps the loaded position
    assert_same(full[3:], list(resumed))
    assert resumed.state_dict()["step"] == len(full)
    assert_same(full, epoch(dali, 1))  # the abandoned loader starts the epoch over cleanly


def test_rows_are_read_by_dali(stores, monkeypatch):
    """The region arrays come from DALI's readers, not the host memory map: hide them from the host."""
    ld = loader("dali", stores, seed=8)
    expected = epoch(loader("torch", stores, seed=8))
    arrays = dict(ld.sampler.regions.arrays)
    for name in ("boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf"):
        arrays[name] = np.full_like(arrays[name], 7)
    monkeypatch.setattr(ld.sampler.regions, "arrays", arrays)
    assert_same(expected, epoch(ld))
    assert ld.pipeline_runs == len(expected)


def test_batch_dtypes_and_device(stores):
    batch = next(iter(loader("dali", stores, seed=9)))
    assert batch.visual_feats.dtype == batch.visual_pos.dtype == torch.float32
    assert batch.input_ids.dtype == batch.obj_labels["obj"][0].dtype == torch.int64
    assert batch.visual_feats.shape == (8, 36, batch.visual_feats.shape[2])
    assert batch.visual_attention_mask is not None  # 33 real regions of 36


def test_missing_dali_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match="nvidia-dali-cuda130==2.4.0"):
        import_dali()
