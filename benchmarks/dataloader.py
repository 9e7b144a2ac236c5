"""Pre-training data loaders compared: samples/s, store bytes/s and the consumer's wait per batch.

    python -m benchmarks.dataloader [--quick] [--images N] [--feat-dim D] [--batch-size B] [--steps S]
                                    [--step-ms T] [--data-dir DIR] [--out PATH]

Every loader kind on one synthetic store (converted once, cached under --data-dir): the time `next(loader)` blocks
the consumer (on a GPU the batch synchronised first), samples/s with the consumer's own step (`--step-ms`, a
sleep) included, store bytes/s read, and the loader's setup time. What the rows so far are: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness
from engine.data import convert, synthetic
from engine.data.batch import PretrainBatch
from engine.data.loaders import PretrainLoader, make_loader
from engine.data.sampling import SamplingConfig
from engine.data.store import RegionStore, StoreError, TextStore

DEFAULT_DATA_DIR = Path("/tmp/lxmert-dataloader-bench")
FULL = dict(images=2000, feat_dim=2048, batch_size=64, steps=60, warmup=5, workers=(0, 2, 4))
QUICK = dict(images=40, feat_dim=32, batch_size=8, steps=6, warmup=2, workers=(0, 2))
COLUMNS = (
    "loader; workers; batch_size=batch; samples_per_s=samples/s; mb_per_s=store MB/s; wait_median_ms=wait median ms; "
    "wait_p80_ms=wait p80 ms; setup_s=setup s; note"
)


# --------------------------------------------------------------------------------------------- data


def dataset(data_dir: Path, images: int, feat_dim: int) -> tuple[TextStore, RegionStore]:
    """The (text, region) stores of a synthetic set of `images` images, converted once and reused."""
    root = data_dir / f"{images}x{feat_dim}"
    try:
        return TextStore(root / "text"), RegionStore(root / "feats")
    except StoreError:
        pass
    start = time.perf_counter()
    syn = root / "synthetic"
    synthetic.generate(syn, images, feat_dim=feat_dim, seed=0)
    convert_synthetic(syn, root, feat_dim, ["mscoco_train", "mscoco_minival"])
    shutil.rmtree(syn)  # the stores are what the loaders read
    print(
        f"data set {images} images x {feat_dim} features converted into {root} in {time.perf_counter() - start:.1f} s"
    )
    return TextStore(root / "text"), RegionStore(root / "feats")


def convert_synthetic(syn: Path, root: Path, feat_dim: int, texts: Sequence[str], fp32: bool = False) -> None:
    """A synthetic set's regions (both splits' TSVs) into root/feats and its `texts` sentence files into root/text."""
    tsvs = [syn / "mscoco_imgfeat/train2014_obj36.tsv", syn / "mscoco_imgfeat/val2014_obj36.tsv"]
    convert.convert_features(tsvs, root / "feats", feat_dim=feat_dim, fp32=fp32, progress=False, overwrite=True)
    sentences, answers = [syn / f"lxmert/{name}.json" for name in texts], syn / "lxmert/all_ans.json"
    convert.convert_text(sentences, root / "feats", root / "text", answers=answers, progress=False, overwrite=True)


def sample_bytes(text: TextStore, regions: RegionStore) -> int:
    """Store bytes one sample reads: its image's rows of every region array and its token row."""
    arrays = ("features", "boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf")
    return sum(regions.arrays[name][0].nbytes for name in arrays) + text.arrays["token_ids"][0].nbytes


# ------------------------------------------------------------------------------------------- timing


def endless(loader: PretrainLoader) -> Iterator[PretrainBatch]:
    """Batches across epochs."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(loader: PretrainLoader, steps: int, warmup: int, step_ms: float, cuda: bool) -> dict[str, Any]:
    batches = endless(loader)
    for _ in range(warmup):
        next(batches)
    waits = []
    start = time.perf_counter()
    for _ in range(steps):
        before = time.perf_counter()
        batch = next(batches)
        if cuda:
            torch.cuda.synchronize()
        waits.append((time.perf_counter() - before) * 1e3)
        if step_ms:
            time.sleep(step_ms / 1e3)
    elapsed = time.perf_counter() - start
    stats = harness.summarize(waits)
    waited = {f"wait_{q}_ms": stats[f"{q}_ms"] for q in ("median", "p20", "p80")}
    row = {"samples_per_s": steps * batch.batch_size / elapsed, **waited, "wait_mean_ms": sum(waits) / len(waits)}
    return row | {"elapsed_s": elapsed, "batch_device": str(batch.visual_feats.device)}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    text, regions = dataset(args.data_dir, args.images, args.feat_dim)
    per_sample = sample_bytes(text, regions)
    env = harness.environment()
    common = dict(env, benchmark="dataloader", images=len(regions), samples=len(text), feat_dim=regions.feat_dim)
    common.update(feature_dtype=str(regions.arrays["features"].dtype), batch_size=args.batch_size, steps=args.steps)
    common.update(warmup=args.warmup, step_ms=args.step_ms, sample_bytes=per_sample, quick=args.quick)
    config = SamplingConfig(seed=0, batch_size=args.batch_size)
    kinds = [("torch", w, {"num_workers": w}) for w in args.workers]  # (kind, workers, make_loader options)
    kinds += [("gpu", 0, {}), ("dali", args.dali_threads, {"num_workers": args.dali_threads})]
    rows = []
    for kind, workers, options in kinds:
        row = {**common, "loader": kind, "workers": workers}
        start = time.perf_counter()
        try:
            loader = make_loader(kind, text, regions, config, device, **options)
        except ImportError as error:  # DALI not installed
            rows.append({**row, "note": f"skipped: {str(error).split(':')[0]}"})
            print(f"{kind}: skipped ({error})")
            continue
        row["setup_s"] = time.perf_counter() - start
        row.update(measure(loader, args.steps, args.warmup, args.step_ms, cuda))
        row["mb_per_s"] = row["samples_per_s"] * per_sample / 1e6
        row["bytes_per_s"] = row["samples_per_s"] * per_sample
        del loader  # persistent workers and DALI threads go before the next kind starts
        rows.append(row)
        print(
            f"{kind:5s} workers {workers}: {row['samples_per_s']:9.0f} samples/s, {row['mb_per_s']:8.1f} MB/s, "
            f"wait median {row['wait_median_ms']:.2f} ms",
            flush=True,
        )
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    where = (
        f"GPU measurements on {first['device']}"
        if first["measured_on"] == "gpu"
        else f"CPU measurements (no GPU; host {first['host_cpu']}, {first['cpu_count']} cores), not GPU numbers"
    )
    return (
        f"# Data loader benchmark: {where}\n\n{first['images']} images ({first['samples']} samples), features "
        f"{first['feat_dim']} x {first['feature_dtype']}, {first['sample_bytes']} store bytes a sample; "
        f"batch {first['batch_size']}, {first['steps']} timed steps after {first['warmup']}, consumer step "
        f"{first['step_ms']} ms; torch {first['torch']}, DALI {first['dali']}, commit {first['commit']}, "
        f"{first['date']}.\n\n{harness.markdown_table(rows, COLUMNS)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dataloader", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny data set and a few steps (a smoke run)")
    parser.add_argument("--images", type=int, help=f"images in the synthetic set (default {FULL['images']})")
    parser.add_argument("--feat-dim", type=int, help=f"region feature size (default {FULL['feat_dim']})")
    parser.add_argument("--batch-size", type=int, help=f"samples a batch (default {FULL['batch_size']})")
    parser.add_argument("--steps", type=int, help=f"timed steps a loader (default {FULL['steps']})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps first (default {FULL['warmup']})")
    parser.add_argument("--workers", type=int, nargs="+", help="torch DataLoader worker counts (default 0 2 4)")
    parser.add_argument("--dali-threads", type=int, default=4, help="DALI CPU threads (default 4)")
    parser.add_argument("--step-ms", type=float, default=0.0, help="the consumer's simulated step time (sleep)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where converted stores are cached")
    parser.add_argument("--out", type=Path, default=harness.RUNS_DIR / "dataloader.jsonl", help="rows; .md beside")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not torch.cuda.is_available():
        print("no GPU: CPU measurements (every row says device 'cpu')")
    rows = run(args)
    harness.append_rows(args.out, rows)
    md_path = harness.write_summary(args.out.with_suffix(".md"), [report(rows)])
    print(f"{len(rows)} rows appended to {args.out}; table in {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
