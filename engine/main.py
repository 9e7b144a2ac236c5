"""A short pre-training run of a small LXMERT on synthetic data, on the CPU, in under a minute.

The README's main job until the real engine (data store, DeepSpeed loop, checkpoints) lands. It runs the
whole pre-training path: the six loss components, backward, clipping, fused AdamW. The synthetic world is
learnable: each image is a scene of three object classes, each region a noisy prototype of its class plus an
attribute; its caption names the attributes and classes of its first regions; half of the pairs get another
image's caption; the answer is the class of the first object the caption names. Within 100 steps the masked
words and the region labels are learnt and the total falls by more than half; matching and QA, which need the
cross-modality path, stay near chance that early.

    python -m engine.main --steps 100 --batch-size 16 --seed 0
"""

import argparse
import sys
import time
from collections import defaultdict
from statistics import mean

import torch

import lxmert

CLS, SEP, MASK = 101, 102, 103  # BERT uncased special tokens ([PAD] is 0)
OBJECT_WORDS = 2000  # object class c is the word id OBJECT_WORDS + c
ATTRIBUTE_WORDS = 3000  # attribute a is the word id ATTRIBUTE_WORDS + a
MASK_PROBABILITY = 0.15  # for both words and regions, as in the authors' pre-training
MIN_FALL = 0.1  # the run fails unless the last 10 steps' mean total loss is this much below the first 10's


def small_config() -> "lxmert.LxmertConfig":
    return lxmert.LxmertConfig(
        hidden_size=128, num_attention_heads=4, intermediate_size=256,
        l_layers=2, r_layers=1, x_layers=1,
        num_qa_labels=50, num_object_labels=40, num_attr_labels=20, visual_feat_dim=64,
    )


class SyntheticPretrainingData:
    """Batches of forward keywords for LxmertForPreTraining, drawn from a fixed random 'world'."""

    def __init__(
        self, config, seed: int, num_regions: int = 36, seq_len: int = 20, max_mentions: int = 4,
        classes_per_image: int = 3,
    ):
        self.config = config
        self.num_regions = num_regions
        self.seq_len = seq_len
        self.max_mentions = max_mentions  # regions named in a caption: 2 words each, plus [CLS] and [SEP]
        self.classes_per_image = classes_per_image  # few, so that another image's caption rarely fits
        assert 2 + 2 * max_mentions <= seq_len
        self.rng = torch.Generator().manual_seed(seed)
        feat_dim = config.visual_feat_dim
        self.object_prototypes = torch.randn(config.num_object_labels, feat_dim, generator=self.rng)
        self.attribute_prototypes = 0.5 * torch.randn(config.num_attr_labels, feat_dim, generator=self.rng)

    def _rand(self, *shape):
        return torch.rand(*shape, generator=self.rng)

    def _randint(self, high, *shape):
        return torch.randint(high, shape, generator=self.rng)

    def batch(self, batch_size: int) -> dict:
        cfg, B, R, L = self.config, batch_size, self.num_regions, self.seq_len

        # Images: a scene of a few object classes; per region one of them, an attribute, a feature and a box.
        scenes = self._randint(cfg.num_object_labels, B, self.classes_per_image)
        objects = scenes.gather(1, self._randint(self.classes_per_image, B, R))
        attributes = self._randint(cfg.num_attr_labels, B, R)
        region_feats = (self.object_prototypes[objects] + self.attribute_prototypes[attributes]
                        + 0.1 * torch.randn(B, R, cfg.visual_feat_dim, generator=self.rng))
        corners = self._rand(B, R, 2, 2)  # two random points per region span its box
        boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)  # x1, y1, x2, y2

        # Captions "[CLS] attr obj attr obj ... [SEP]" naming regions 0..n-1; half of them from another image.
        matched = self._rand(B) < 0.5
        source = torch.where(matched, torch.arange(B), (torch.arange(B) + 1) % B)
        mentions = 1 + self._randint(self.max_mentions, B)
        words = torch.stack([ATTRIBUTE_WORDS + attributes[:, : self.max_mentions],
                             OBJECT_WORDS + objects[:, : self.max_mentions]], dim=-1).flatten(1)[source]
        positions = torch.arange(L)
        caption_len = 2 + 2 * mentions[source]  # [CLS] + words + [SEP]
        input_ids = torch.zeros(B, L, dtype=torch.long)
        input_ids[:, 1 : 1 + words.shape[1]] = words
        input_ids[:, 0] = CLS
        input_ids[positions >= caption_len[:, None] - 1] = 0
        input_ids[torch.arange(B), caption_len - 1] = SEP
        attention_mask = (positions < caption_len[:, None]).long()

        # Word masking: 15% of the words (at least one a caption); 80% [MASK], 10% a random attribute word,
        # 10% kept.
        is_word = (positions > 0) & (positions < caption_len[:, None] - 1)
        draw = torch.where(is_word, self._rand(B, L), 2.0)
        masked = (draw < MASK_PROBABILITY) | (draw == draw.min(dim=1, keepdim=True).values)
        labels = torch.where(masked, input_ids, -1)
        action = self._rand(B, L)
        input_ids = torch.where(masked & (action < 0.8), MASK, input_ids)
        random_words = ATTRIBUTE_WORDS + self._randint(cfg.num_attr_labels, B, L)
        input_ids = torch.where(masked & (action >= 0.8) & (action < 0.9), random_words, input_ids)

        # Region masking: 15%; 80% zeroed, 10% another region's feature, 10% kept. Targets are the originals.
        region_mask = self._rand(B, R) < MASK_PROBABILITY
        action = self._rand(B, R)
        other = region_feats.flatten(0, 1)[self._randint(B * R, B, R)]
        visual_feats = torch.where((region_mask & (action < 0.8))[..., None], 0.0, region_feats)
        visual_feats = torch.where((region_mask & (action >= 0.8) & (action < 0.9))[..., None], other, visual_feats)

        return dict(
            input_ids=input_ids,
            visual_feats=visual_feats,
            visual_pos=boxes,
            attention_mask=attention_mask,
            labels=labels,
            obj_labels={
                "obj": (objects, 0.5 + 0.5 * self._rand(B, R)),
                "attr": (attributes, 0.5 + 0.5 * self._rand(B, R)),
                "feat": (region_feats, region_mask.float()),
            },
            matched_label=matched.long(),
            ans=torch.where(matched, objects[:, 0], -1),  # QA only on matched pairs
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    log_every = 10
    if args.steps < 2 * log_every:
        parser.error(f"--steps must be at least {2 * log_every} to compare the first and last {log_every} steps")

    torch.manual_seed(args.seed)
    config = small_config()
    model = lxmert.LxmertForPreTraining(config)
    model.train()
    data = SyntheticPretrainingData(config, seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    print(f"LXMERT pre-training on synthetic data: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{args.steps} steps at batch {args.batch_size}, lr {args.lr}, seed {args.seed}, device cpu")

    history = defaultdict(list)  # component name -> one float a step; each log line prints its window's mean
    pending = []  # detached loss tensors not yet read, so the host syncs once a logging step
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        out = model(**data.batch(args.batch_size))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        pending.append({"total": out.loss.detach(), **{k: v.detach() for k, v in out.losses.items()}})
        if step % log_every == 0 or step == args.steps:
            window = len(pending)
            for losses in pending:
                for name, value in losses.items():
                    history[name].append(value.item())
            pending.clear()
            means = "  ".join(f"{name} {mean(values[-window:]):.4f}" for name, values in history.items())
            print(f"step {step:4d}  {means}")
    elapsed = time.perf_counter() - start

    print(f"\n{'component':>12}  first {log_every}  last {log_every}")
    for name, values in history.items():
        first, last = mean(values[:log_every]), mean(values[-log_every:])
        print(f"{name:>12}  {first:8.4f}  {last:8.4f}")
    print(f"{args.steps * args.batch_size / elapsed:.1f} samples/s ({elapsed:.1f} s for {args.steps} steps)")

    first, last = mean(history["total"][:log_every]), mean(history["total"][-log_every:])
    if not last < (1 - MIN_FALL) * first:  # a margin, so that batch-to-batch noise does not count as learning
        print(f"FAILED: the total loss did not fall by {MIN_FALL:.0%} ({first:.4f} -> {last:.4f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
