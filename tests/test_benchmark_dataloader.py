"""benchmarks.dataloader end to end at a tiny size: it converts (and then reuses) a data set, times every loader
kind and writes rows and a table that say where they were measured. Not a timed test: only that it runs and records.
"""

from __future__ import annotations

import importlib.util
import json

import torch

from benchmarks import dataloader

CUDA = torch.cuda.is_available()


def test_quick_run_writes_rows_and_table(tmp_path):
    out = tmp_path / "results" / "dataloader.jsonl"
    argv = "--quick --images 12 --steps 3 --warmup 1 --workers 0 1 --dali-threads 2".split()
    argv += ["--data-dir", str(tmp_path / "data"), "--out", str(out)]
    assert dataloader.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["loader"], r["workers"]) for r in rows] == [("torch", 0), ("torch", 1), ("gpu", 0), ("dali", 2)]
    dali = importlib.util.find_spec("nvidia.dali") is not None
    for row in rows:
        assert row["benchmark"] == "dataloader" and row["batch_size"] == 8 and row["images"] == 12
        assert row["device"] == ("cpu" if not CUDA else torch.cuda.get_device_name(0))
        assert row["measured_on"] == ("gpu" if CUDA else "cpu")
        assert row["commit"] is None or row["commit"]
        if row["loader"] == "dali" and not dali:
            assert row["note"].startswith("skipped")
            continue
        assert row["samples_per_s"] > 0 and row["bytes_per_s"] == row["samples_per_s"] * row["sample_bytes"]
        assert row["wait_p20_ms"] <= row["wait_median_ms"] <= row["wait_p80_ms"]
        assert row["batch_device"].startswith("cuda" if CUDA else "cpu")
    table = out.with_suffix(".md").read_text()
    assert ("GPU measurements" if CUDA else "CPU measurements (no GPU") in table
    assert table.count("\n| ") == 1 + len(rows)

    cached = tmp_path / "data" / "12x32"
    stamp = (cached / "feats" / "meta.json").stat().st_mtime_ns
    assert dataloader.main([*argv, "--steps", "1"]) == 0  # the converted stores are reused
    assert (cached / "feats" / "meta.json").stat().st_mtime_ns == stamp
    assert len(out.read_text().splitlines()) == 2 * len(rows)
