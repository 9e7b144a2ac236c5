"""The "dali" pre-training loader: NVIDIA DALI reads the region rows, the sampling plan decides which.

    loader = make_loader("dali", text_dir, feats_dir, SamplingConfig(...), device="cuda", num_workers=4)

Same batches as the "torch" and "gpu" loaders, bit for bit (tests/test_data_dali.py): PretrainSampler.plan
stays the single source of truth for order, sharding and masking, and DALI only moves bytes.

Design (one DALI pipeline per pass over an epoch, rebuilt when a pass starts: a pass abandoned mid-epoch
leaves prefetched batches behind, and a fresh pipeline is cheaper and surer than draining one):
- A fn.external_source fed by a Python generator yields, per step, the plan's image rows (one int per
  sample) and the step number. The generator draws the plan and builds the text side on the host
  (text_arrays, a few KB) and parks both in a small dict keyed by step; DALI calls it prefetch_queue_depth
  steps ahead, so plan drawing overlaps the consumer. At the pass's last step it raises StopIteration,
  which ends the DALI epoch: the pass length comes from the plan, never from a reader.
- Six fn.readers.numpy, one per region array of the store (features, boxes, obj/attr ids and confidences),
  each over the ONE big .npy file (store.array_path) with roi_start = the image row on axis 0 and
  roi_shape 1: a per-sample slice read by DALI's threads (memory-mapped: pread slices, dont_use_mmap=True,
  measured 3-5x slower on the CPU machine). Every sample of a reader is the
  same file, so the reader's own notion of an epoch, shuffling (off) and sharding (num_shards=1) never
  decide anything; pad_last_batch=True is set anyway, since a DALI reader without it drifts from one epoch
  to the next (measured with DALI 2.4: 179 of 200 unique samples in a second epoch). Ranks are sharded by
  the plan (SamplingConfig.rank), not by DALI's shard_id.
- With `unpadding` (attn_backend "flash") the generator also finds the masks' Unpadding with the text
  (host_unpadding), which rides along as the text does.
- The random-replacement source rows (plan.replace_image/replace_region, about 1.5% of the regions, a
  variable count per batch that a fixed-batch pipeline cannot carry) are gathered from the memory map on
  the host with the text.
- On a GPU (device "cuda:i") the region outputs go `.gpu()` inside the pipeline (DALI's copy stream),
  DALIGenericIterator hands them to torch on the current stream, and mask_regions runs on the device.
  With device "cpu" the pipeline is CPU-only (device_id=None) and the masking runs on the CPU tensors.
The batch is then assembled and widened exactly as the other loaders do (assemble, PretrainBatch.to).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from engine.data.batch import PretrainBatch
from engine.data.batching import PretrainLoader, assemble, host_unpadding, text_arrays
from engine.data.sampling import BatchPlan, PretrainSampler, mask_regions
from engine.data.store import REGION_LABELS
from lxmert.attention import Unpadding

Tensor = torch.Tensor
DALI_PACKAGE = "nvidia-dali-cuda130==2.4.0"
REGION_ARRAYS = ("features", *REGION_LABELS)  # read by DALI, in the pipeline's output order


def import_dali() -> tuple[Any, Any, Any, Any]:
    """(fn, types, pipeline_def, DALIGenericIterator), or an ImportError that says what to install."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as error:
        raise ImportError(
            f"the 'dali' loader needs NVIDIA DALI: `pip install {DALI_PACKAGE}` (the [data] extra: "
            f"`pip install -e '.[data]'`, or `bash scripts/setup.sh --dev`); or use loader kind 'torch' or 'gpu'"
            f" ({error})"
        ) from error
    return fn, types, pipeline_def, DALIGenericIterator


class DaliLoader(PretrainLoader):
    """Region rows read by DALI's numpy readers at the plan's image indices; text and plan on the host."""

    kind = "dali"

    def __init__(
        self,
        sampler: PretrainSampler,
        device: torch.device | str = "cpu",
        *,
        num_workers: int = 4,
        prefetch: int = 2,
        unpadding: bool = False,
    ) -> None:
        """num_workers: DALI's CPU threads (DataConfig.num_workers; 0 counts as 1); prefetch: batches DALI
        runs ahead (its prefetch_queue_depth), the plans and text of those included; unpadding: the batches
        carry their masks' Unpadding (attn_backend "flash"), found on the host with the text."""
        super().__init__(sampler, device, unpadding)
        self._dali = import_dali()
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"the 'dali' loader runs on 'cpu' or 'cuda', not {self.device}")
        self.num_threads, self.prefetch = max(1, num_workers), max(1, prefetch)
        self._pin = self.device.type == "cuda"
        self.pipeline_runs = 0  # batches DALI has delivered (a check that the rows really come through it)
        self.pipelines_built = 0

    # ------------------------------------------------------------------------------- host side

    def _host_part(self, plan: BatchPlan) -> tuple[dict[str, Tensor], Unpadding | None]:
        arrays = text_arrays(self.sampler.text, plan, self.sampler.config.vocab_size)
        features = self.sampler.regions.arrays["features"]
        arrays.update(
            region_action=plan.region_action,
            blank_at=plan.blank_at,
            replace_at=plan.replace_at,
            replacement=features[plan.replace_image, plan.replace_region],
        )
        tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        unpadding = host_unpadding(plan, tensors, self._pin) if self.unpadding else None
        if self._pin:
            tensors = {name: t.pin_memory() for name, t in tensors.items()}
        return tensors, unpadding

    def _source(
        self, epoch: int, steps: range, parked: dict[int, tuple[BatchPlan, dict[str, Tensor], Unpadding | None]]
    ):
        """The external source: per step, (image rows [B, 1] int32, the step [B, 1] int64)."""
        for step in steps:
            plan = self.sampler.plan(epoch, step)
            parked[step] = plan, *self._host_part(plan)
            rows = plan.image_index.astype(np.int32).reshape(-1, 1)
            yield rows, np.full((len(rows), 1), step, dtype=np.int64)

    # ---------------------------------------------------------------------------------- pipeline

    def _pipeline(self, source: Iterator[tuple[np.ndarray, np.ndarray]]) -> Any:
        fn, types, pipeline_def, _ = self._dali
        regions = self.sampler.regions
        on_gpu = self.device.type == "cuda"

        @pipeline_def(
            batch_size=self.sampler.config.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if on_gpu else None,
            prefetch_queue_depth=self.prefetch,
        )
        def pipeline():  # type: ignore[no-untyped-def]
            rows, step = fn.external_source(source=source, num_outputs=2, dtype=[types.INT32, types.INT64])
            outputs = []
            for name in REGION_ARRAYS:
                row = fn.readers.numpy(
                    files=[str(regions.array_path(name))],
                    roi_start=rows,
                    roi_shape=[1],
                    roi_axes=[0],
                    pad_last_batch=True,
                    name=f"read_{name}",
                )
                outputs.append(row.gpu() if on_gpu else row)
            return (*outputs, step)

        pipe = pipeline()
        pipe.build()
        self.pipelines_built += 1
        return pipe

    # ---------------------------------------------------------------------------------- batches

    def _device_part(
        self, plan: BatchPlan, host: dict[str, Tensor], unpadding: Unpadding | None, read: dict[str, Tensor]
    ) -> PretrainBatch:
        t = {name: v.to(self.device, non_blocking=True) for name, v in host.items()}
        t.update({name: read[name].squeeze(1) for name in REGION_ARRAYS})  # [B, 1, ...] slices -> [B, ...]
        t["visual_feats"], t["feat_mask"] = mask_regions(
            t["features"], t.pop("region_action"), t.pop("blank_at"), t.pop("replace_at"), t.pop("replacement")
        )
        return assemble(plan, t, unpadding).to(self.device)

    def _batches(self, epoch: int, start_step: int) -> Iterator[PretrainBatch]:
        steps = range(start_step, len(self))
        if not steps:
            return
        _, _, _, DALIGenericIterator = self._dali
        parked: dict[int, tuple[BatchPlan, dict[str, Tensor], Unpadding | None]] = {}
        pipe = self._pipeline(self._source(epoch, steps, parked))
        names = [*REGION_ARRAYS, "step"]
        iterator = DALIGenericIterator(pipe, output_map=names, size=-1, auto_reset=False)
        try:
            for expected, outputs in zip(steps, iterator):
                read = outputs[0]  # one pipeline
                step = int(read["step"][0, 0])
                if step != expected:
                    raise RuntimeError(f"DALI delivered step {step} where step {expected} was due")
                self.pipeline_runs += 1
                plan, host, unpadding = parked.pop(step)
                yield self._device_part(plan, host, unpadding, read)
        finally:
            del iterator, pipe
