"""The authors' pre-training sampling, keyed so that every draw is reproducible: which samples a rank gets at
(epoch, step), negatives, word and region masking, QA labels.

What the authors' code does (airsplay/lxmert, src/pretrain/lxmert_data.py and lxmert_pretrain.py), reproduced:
- A sample is one (image, sentence) of the chosen sources: one text-store row (their uid img_source_index).
- Negatives: with p 0.5 the sentence is replaced by one drawn uniformly over all sampled sentences, redrawn
  until its image differs; matched_label 0. The QA label is then -1.
- Word masking, per wordpiece (never [CLS], [SEP] or padding; an [UNK] piece is a wordpiece as for them),
  independently with p 0.15: of those (u / 0.15 < 0.8) [MASK], (< 0.9) a random id uniform over the whole
  vocabulary (random.choice(vocab): specials and [unused] rows included, as theirs), else unchanged.
  labels: the original id at masked positions, -1 elsewhere. Mismatched sentences are masked too.
- Region masking, per real region with p 0.15: 80% zero features, 10% the features of a random region of a
  random image (theirs: a uniformly drawn sentence's image, so images weigh by their sentence count, and a
  region uniform over its real ones: randint(0, 35) for obj36), 10% unchanged. feat target = the original
  features, feat mask 1.0 where masked. obj/attr labels with confidences cover every region (padding: -1, 0).
- QA: a soft label {answer: score} becomes one answer drawn in proportion to the scores; -1 without a label.

Order and sharding. Epoch e's order is a permutation of the N samples: argsort of 64-bit Philox keys of
(seed, epoch) (engine/data/philox.py; about 3 s for the 9.18M pairs, once per process and epoch). Global
batch s (G = batch_size x world_size) holds positions [s G, (s + 1) G); rank r takes the r-th slice of B,
ordered by image (a batch's order means nothing to the losses, and the stores are then read front to back).
drop_last=False (default) keeps every sample: the epoch has ceil(N / G) steps and the last global batch is
filled by wrapping around to the start of the same order (positions >= N hold sample order[p mod N]), so
every rank runs the same number of steps and those few samples are seen twice. drop_last=True: N // G
steps, the tail is dropped (the authors' DataLoader(shuffle=True, drop_last=True)).

Keying of the random draws. Every draw for the sample at position p of epoch e is
Philox4x32-10(key=seed, counter=(block, p, e, stream)), with one stream per kind of decision: SAMPLE
(negative or not, the QA draw), NEGATIVE (the candidate sentences, two a block, in order), TOKENS (a
decision and a random id per token slot), REGIONS (a decision, a source sentence and a source region per
region slot). So a sample's draws depend on (seed, epoch, position) only: not on the batch size, the number
of ranks or workers, the loader, or where a run resumed. `plan(epoch, step)` recomputes everything.

Length bucketing (bucket_batches = k > 1) sorts the fed sentences by length within windows of k global
batches (stable), cuts them into batches and shuffles the batches of the window (Philox keys of the window):
less padding, but it changes which samples share a batch (and a rank), though not any sample's draws.

Decisions and application are split: `plan` draws small integer arrays on the host (which tokens/regions,
which replacement, random ids, random source regions); `mask_tokens` / `mask_regions` apply them to numpy
arrays or torch tensors alike, so the GPU-resident loader masks features where they live.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from engine.data.philox import philox4x32, random_below, to_unit, uniforms
from engine.data.store import RegionStore, TextStore
from lxmert.tokenizer import MASK_ID, VOCAB_SIZE

# counter word 3: one stream per kind of draw
STREAM_ORDER, STREAM_SAMPLE, STREAM_NEGATIVE, STREAM_TOKENS, STREAM_REGIONS, STREAM_BUCKETS = range(1, 7)
# masking actions, for tokens and regions alike
NOT_MASKED, MASK_BLANK, MASK_RANDOM, MASK_KEEP = 0, 1, 2, 3  # blank: [MASK] / zero features
IGNORE = -1
_MAX_NEGATIVE_BLOCKS = 10_000  # redraws before giving up (only a data set of one image could get there)


@dataclass(frozen=True)
class SamplingConfig:
    seed: int = 0
    """Keys every draw (Philox key, 64 bits)."""
    batch_size: int = 256
    """Samples per rank and step."""
    world_size: int = 1
    """Data-parallel ranks sharing an epoch."""
    rank: int = 0
    drop_last: bool = False
    """Drop the last partial global batch (the authors) instead of filling it by wrapping around."""
    bucket_batches: int = 0
    """Sort by sentence length within windows of this many global batches (0 or 1: off)."""
    word_mask_prob: float = 0.15
    region_mask_prob: float = 0.15
    negative_prob: float = 0.5
    """Probability that a sample's sentence is replaced by one of another image (0: no negatives)."""
    vocab_size: int = VOCAB_SIZE
    """Random replacement tokens are uniform over [0, vocab_size)."""
    sources: tuple[str, ...] = ()
    """Text sources sampled (of the store's: mscoco, vg, vqa, gqa, visual7w); empty: all. Negatives and random
    regions are drawn from these sentences only, as the authors draw them from their loaded data."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {self}")
        for name in ("word_mask_prob", "region_mask_prob", "negative_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size


@dataclass
class BatchPlan:
    """Every random decision of one rank's batch, drawn on the host (B samples, Lmax token slots, R regions)."""

    epoch: int
    step: int
    positions: np.ndarray  # [B] int64, the samples' positions in the epoch: the draws' counters
    sample_index: np.ndarray  # [B] int64 text-store rows of the samples
    sentence_index: np.ndarray  # [B] int64 text-store rows fed (differs where negative)
    image_index: np.ndarray  # [B] int64 region-store rows
    matched: np.ndarray  # [B] int8, 1 = own sentence
    lengths: np.ndarray  # [B] int64 tokens of the fed sentences
    num_boxes: np.ndarray  # [B] int64 real regions of the images
    token_action: np.ndarray  # [B, Lmax] int8 NOT_MASKED / MASK_BLANK / MASK_RANDOM / MASK_KEEP
    random_tokens: np.ndarray  # [B, Lmax] int16, the replacement where MASK_RANDOM
    region_action: np.ndarray  # [B, R] int8
    blank_at: np.ndarray  # [K0] int64 flat b * R + r of the MASK_BLANK regions (zeroed)
    replace_at: np.ndarray  # [K] int64 flat b * R + r of the MASK_RANDOM regions
    replace_image: np.ndarray  # [K] int64 their source image
    replace_region: np.ndarray  # [K] int64 and region
    ans: np.ndarray  # [B] int64 answer-table row, -1 = none

    @property
    def max_length(self) -> int:
        """Tokens of the longest fed sentence: the batch's padded length."""
        return int(self.lengths.max())


def _actions(u: np.ndarray, rate: float) -> np.ndarray:
    """The authors' three-way split of one uniform: u < rate masks; u / rate < 0.8 blank, < 0.9 random, else keep."""
    p = u / rate if rate > 0 else np.ones_like(u)
    action = np.where(p < 0.8, MASK_BLANK, np.where(p < 0.9, MASK_RANDOM, MASK_KEEP))
    return np.where(u < rate, action, NOT_MASKED).astype(np.int8)


class PretrainSampler:
    """Which samples rank `config.rank` gets at (epoch, step), and every random decision for them.

    Reads only small arrays of the stores (image_index, lengths, labels, num_boxes; memory-mapped). Pickles
    as its stores' paths and config (the per-epoch caches are rebuilt in the receiving process).
    """

    def __init__(self, text: TextStore, regions: RegionStore, config: SamplingConfig) -> None:
        text.check_features(regions)
        unknown = set(config.sources) - set(text.sources)
        if unknown:
            raise ValueError(f"sources {sorted(unknown)} are not in {text.path} (it has {text.sources})")
        self.text, self.regions, self.config = text, regions, config
        self._bind()
        self.num_samples = len(text) if self._rows is None else len(self._rows)
        self.max_length = text.max_length
        self.num_regions = regions.num_regions
        g = config.global_batch_size
        self.steps_per_epoch = self.num_samples // g if config.drop_last else -(-self.num_samples // g)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_samples} samples make no global batch of {g} with drop_last")
        images = self._image_index[self._row(np.arange(self.num_samples))]
        if config.negative_prob > 0 and (images == images[0]).all():
            raise ValueError("negatives need sentences of at least two images")

    def _bind(self) -> None:
        """Views of the stores' small arrays (memory-mapped) and empty per-epoch caches."""
        a = self.text.arrays
        self._image_index, self._lengths = a["image_index"], a["lengths"]
        self._label_offsets, self._label_ids, self._label_scores = a["label_offsets"], a["label_ids"], a["label_scores"]
        self._num_boxes = self.regions.arrays["num_boxes"]
        self._rows: np.ndarray | None = None  # text-store rows of the samples; None: every row
        if self.config.sources:
            wanted = [self.text.sources.index(name) for name in self.config.sources]
            self._rows = np.flatnonzero(np.isin(a["source_id"], wanted))
        self._order: tuple[int, np.ndarray] | None = None
        self._window: tuple[int, int, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, object]:
        keep = ("text", "regions", "config", "num_samples", "max_length", "num_regions", "steps_per_epoch")
        return {name: self.__dict__[name] for name in keep}  # the stores pickle as their paths

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._bind()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _row(self, sample: np.ndarray) -> np.ndarray:
        """Text-store rows of sample numbers (in [0, num_samples))."""
        return sample if self._rows is None else self._rows[sample]

    # ------------------------------------------------------------------------------------ order

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [N]: the samples (text-store rows) in epoch `epoch`'s order (cached for the latest epoch)."""
        cached = self._order  # read once: a prefetch thread may replace it
        if cached is None or cached[0] != epoch:
            n = np.arange(self.num_samples, dtype=np.int64)
            w = philox4x32(n, n >> 32, epoch, STREAM_ORDER, self.config.seed)
            keys = (w[0].astype(np.uint64) << np.uint64(32)) | w[1].astype(np.uint64)
            cached = self._order = (epoch, self._row(np.argsort(keys, kind="stable")))
        return cached[1]

    def global_positions(self, epoch: int, step: int) -> np.ndarray:
        """int64 [G]: the positions of global batch `step` (every rank's samples, rank-major)."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} out of range for {self.steps_per_epoch} steps an epoch")
        g, k = self.config.global_batch_size, self.config.bucket_batches
        if k <= 1:
            return np.arange(step * g, (step + 1) * g, dtype=np.int64)
        window = step // k
        cached = self._window
        if cached is None or cached[:2] != (epoch, window):
            first = window * k
            count = min(k, self.steps_per_epoch - first)
            positions = np.arange(first * g, (first + count) * g, dtype=np.int64)
            _, sentences, _, _ = self._fed(epoch, positions)
            by_length = positions[np.argsort(self._lengths[sentences], kind="stable")].reshape(count, g)
            w = philox4x32(np.arange(count), window, epoch, STREAM_BUCKETS, self.config.seed)
            cached = self._window = (epoch, window, by_length[np.argsort(w[0], kind="stable")])
        return cached[2][step % k]

    def positions(self, epoch: int, step: int) -> np.ndarray:
        """int64 [B]: this rank's positions at (epoch, step)."""
        b, r = self.config.batch_size, self.config.rank
        return self.global_positions(epoch, step)[r * b : (r + 1) * b]

    # ------------------------------------------------------------------------------------ draws

    def _fed(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(samples, fed sentences, negative [bool], the QA draw) at `positions`."""
        samples = self.epoch_order(epoch)[positions % self.num_samples]
        u = uniforms(self.config.seed, positions, epoch, STREAM_SAMPLE, 2)  # the negative decision, the QA draw
        negative = u[:, 0] < self.config.negative_prob
        sentences = samples.copy()
        if negative.any():
            images = self._image_index[samples[negative]]
            sentences[negative] = self._negatives(epoch, positions[negative], images)
        return samples, sentences, negative, u[:, 1]

    def _negatives(self, epoch: int, positions: np.ndarray, images: np.ndarray) -> np.ndarray:
        """A sentence of another image for each position: uniform candidates, the first whose image differs."""
        out = np.empty(len(positions), dtype=np.int64)
        todo = np.arange(len(positions))
        for block in range(_MAX_NEGATIVE_BLOCKS):
            if not todo.size:
                return out
            w = philox4x32(block, positions[todo], epoch, STREAM_NEGATIVE, self.config.seed)
            u = np.stack([to_unit(w[0], w[1]), to_unit(w[2], w[3])])
            candidates = self._row(random_below(u, self.num_samples))
            ok = self._image_index[candidates] != images[todo]  # [2, T]
            found = ok.any(axis=0)
            first = np.where(ok[0], 0, 1)
            out[todo[found]] = candidates[first[found], np.flatnonzero(found)]
            todo = todo[~found]
        raise RuntimeError(f"no sentence of another image found in {2 * _MAX_NEGATIVE_BLOCKS} draws")

    def plan_positions(self, epoch: int, positions: np.ndarray, step: int = -1) -> BatchPlan:
        """Every decision for the samples at `positions` of `epoch` (a pure function of seed, epoch, positions)."""
        cfg, seed = self.config, self.config.seed
        positions = np.asarray(positions, dtype=np.int64)
        samples, sentences, negative, qa_draw = self._fed(epoch, positions)
        images = self._image_index[samples].astype(np.int64)
        lengths = self._lengths[sentences].astype(np.int64)
        num_boxes = self._num_boxes[images].astype(np.int64)

        slots = np.arange(self.max_length)
        u = uniforms(seed, positions, epoch, STREAM_TOKENS, 2 * self.max_length).reshape(len(positions), -1, 2)
        wordpiece = (slots >= 1) & (slots < lengths[:, None] - 1)  # between [CLS] and [SEP]
        token_action = np.where(wordpiece, _actions(u[..., 0], cfg.word_mask_prob), NOT_MASKED).astype(np.int8)
        random_tokens = random_below(u[..., 1], cfg.vocab_size).astype(np.int16)

        r = self.num_regions
        u = uniforms(seed, positions, epoch, STREAM_REGIONS, 3 * r).reshape(len(positions), r, 3)
        real = np.arange(r) < num_boxes[:, None]
        region_action = np.where(real, _actions(u[..., 0], cfg.region_mask_prob), NOT_MASKED).astype(np.int8)
        blank_at = np.flatnonzero(region_action == MASK_BLANK)
        b, k = np.nonzero(region_action == MASK_RANDOM)
        source_images = self._image_index[self._row(random_below(u[b, k, 1], self.num_samples))].astype(np.int64)
        source_regions = random_below(u[b, k, 2], np.maximum(self._num_boxes[source_images], 1))

        ans = sample_answers(self._label_offsets, self._label_ids, self._label_scores, samples, qa_draw)
        ans[negative] = IGNORE
        return BatchPlan(
            epoch=epoch,
            step=step,
            positions=positions,
            sample_index=samples,
            sentence_index=sentences,
            image_index=images,
            matched=(~negative).astype(np.int8),
            lengths=lengths,
            num_boxes=num_boxes,
            token_action=token_action,
            random_tokens=random_tokens,
            region_action=region_action,
            blank_at=blank_at,
            replace_at=b * r + k,
            replace_image=source_images,
            replace_region=source_regions,
            ans=ans,
        )

    def plan(self, epoch: int, step: int) -> BatchPlan:
        """This rank's batch at (epoch, step), its samples ordered by image (store rows read in order)."""
        positions = self.positions(epoch, step)
        images = self._image_index[self.epoch_order(epoch)[positions % self.num_samples]]
        return self.plan_positions(epoch, positions[np.argsort(images, kind="stable")], step)

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[BatchPlan]:
        """This rank's batches of `epoch` from `start_step` on: the same plans an uninterrupted run makes."""
        for step in range(start_step, self.steps_per_epoch):
            yield self.plan(epoch, step)


def sample_answers(
    label_offsets: np.ndarray, label_ids: np.ndarray, label_scores: np.ndarray, rows: np.ndarray, u: np.ndarray
) -> np.ndarray:
    """int64 [len(rows)]: for each text-store row, one of its label's answers drawn in proportion to the scores
    by the inverse CDF of the uniform `u` (the authors' np.random.multinomial); -1 where it has no label.
    Labels are ragged as the store keeps them: row i owns label_ids/label_scores[offsets[i]:offsets[i + 1]]."""
    lo, hi = label_offsets[rows], label_offsets[rows + 1]
    counts = hi - lo
    ans = np.full(len(rows), IGNORE, dtype=np.int64)
    labelled = np.flatnonzero(counts)
    if not labelled.size:
        return ans
    seg = np.zeros(labelled.size + 1, dtype=np.int64)
    np.cumsum(counts[labelled], out=seg[1:])
    flat = np.repeat(lo[labelled] - seg[:-1], counts[labelled]) + np.arange(seg[-1])  # label rows, in order
    cum = np.cumsum(label_scores[flat].astype(np.float64))
    base = np.concatenate([[0.0], cum])[seg[:-1]]  # cumulative score before each row's labels
    total = cum[seg[1:] - 1] - base
    pick = np.searchsorted(cum, base + u[labelled] * total, side="right")
    pick = np.where(total > 0, np.clip(pick, seg[:-1], seg[1:] - 1), seg[:-1])  # all-zero scores: the first
    ans[labelled] = label_ids[flat[pick]]
    return ans


# ----------------------------------------------------------------------------- applying the decisions

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def mask_tokens(token_ids: Array, action: Array, random_tokens: Array) -> tuple[Array, Array]:
    """(input ids, MLM labels) from token ids [B, L] and the plan's action / random ids cut to [B, L].

    numpy arrays or torch tensors (all of one kind); the results keep token_ids' dtype."""
    if isinstance(token_ids, torch.Tensor):
        where, ignore, mask_id = torch.where, IGNORE, MASK_ID
    else:
        where, ignore, mask_id = np.where, token_ids.dtype.type(IGNORE), token_ids.dtype.type(MASK_ID)
    labels = where(action != NOT_MASKED, token_ids, ignore)
    inputs = where(action == MASK_RANDOM, random_tokens, token_ids)
    inputs = where(action == MASK_BLANK, mask_id, inputs)
    return inputs, labels


def mask_regions(
    features: Array, action: Array, blank_at: Array, replace_at: Array, replacement: Array
) -> tuple[Array, Array]:
    """(masked features, feat mask) from features [B, R, D] (left unchanged), the plan's region action [B, R],
    the flat rows (b * R + r) to zero, blank_at [K0], and to replace, replace_at [K], with replacement [K, D].

    numpy arrays or torch tensors on one device; the mask has the features' dtype (1 = masked). A copy and
    two row scatters (no host synchronisation on a GPU: the rows come from the host-drawn plan)."""
    batch, regions, dim = features.shape
    if isinstance(features, torch.Tensor):
        masked, feat_mask = features.clone(), (action != NOT_MASKED).to(features.dtype)
    else:
        masked, feat_mask = features.copy(), (action != NOT_MASKED).astype(features.dtype)
    rows = masked.reshape(batch * regions, dim)  # a view of the fresh copy
    rows[blank_at] = 0
    rows[replace_at] = replacement
    return masked, feat_mask
