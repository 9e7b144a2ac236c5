"""benchmarks.projection's formulas on hand-computed cases, and benchmarks.scaling under the DeepSpeed launcher with
2 CPU ranks: the bytes DeepSpeed's communication logger (and a torch.distributed counter) see per step against the
analytic count.

Tolerance of the byte comparison: 1% (DeepSpeed pads flat partitions to an alignment; the gradient-norm and
overflow all-reduces add a few bytes). Measured on 2 CPU ranks the textbook configuration matched to 0.01%.
The launch takes ~25-35 s, mostly start-up; a rank may abort at exit after writing its rows, so the test reads the
rows. No /dev/shm file is left behind (DeepSpeed's CPU shared-memory comm op stays off: engine/launch.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import projection as pj
from benchmarks import scaling
from engine.launch import deepspeed_available

BYTES_TOL = 0.01

# ------------------------------------------------------------------------------------------- projection


def test_zero_bytes_per_rank_by_hand():
    psi, b, n = 1000, 2, 4
    assert pj.wire_bytes(pj.zero_collectives(0, psi, b, b), n) == 2 * 3 / 4 * psi * b  # all-reduce: 3000
    for stage in (1, 2):
        assert pj.wire_bytes(pj.zero_collectives(stage, psi, b, b), n) == 3000  # reduce-scatter + all-gather
        all_reduced = pj.zero_collectives(stage, psi, b, b, gradient_all_reduce=True)
        assert pj.wire_bytes(all_reduced, n) == 4500  # DeepSpeed's default: all-reduce + all-gather = 1.5x
    assert pj.wire_bytes(pj.zero_collectives(3, psi, b, b), n) == 4500  # 1.5x ZeRO-2
    tied = pj.zero_collectives(3, psi, b, b, tied_params=100)  # gathered twice a pass: + 2 x 100 x b x 3/4
    assert pj.wire_bytes(tied, n) == 4500 + 2 * 100 * b * 3 / 4
    assert pj.wire_bytes(pj.zero_collectives(2, psi, b, b), 1) == 0
    with pytest.raises(ValueError):
        pj.zero_collectives(4, psi)


def test_zero3_sends_one_and_a_half_times_zero2_for_any_size():
    for psi, n in ((228_051_752, 8), (1_067_898, 2), (7, 64)):
        z2 = pj.wire_bytes(pj.zero_collectives(2, psi), n)
        assert pj.wire_bytes(pj.zero_collectives(3, psi), n) == pytest.approx(1.5 * z2, rel=1e-12)
        assert pj.wire_bytes(pj.zero_collectives(0, psi), n) == pytest.approx(z2, rel=1e-12)


def test_collective_time_two_levels_by_hand():
    links = pj.Links(nvlink_gbs=400, ib_gbs=50, gpus_per_node=8, nvlink_latency_us=0, ib_latency_us=0)
    gather = pj.Collective("all_gather", 8e9)
    # one node of 8: (7/8) S / B_nvlink
    assert pj.collective_time(gather, 8, links) == pytest.approx(7 / 8 * 8e9 / 400e9)
    # two nodes of 8: + (1/2) (S/8) / B_ib
    assert pj.collective_time(gather, 16, links) == pytest.approx(7 / 8 * 8e9 / 400e9 + 1 / 2 * 1e9 / 50e9)
    assert pj.collective_time(pj.Collective("all_reduce", 8e9), 16, links) == pytest.approx(2 * 0.0275)
    latency = pj.Links(nvlink_latency_us=10, ib_latency_us=25)
    calls = pj.Collective("all_gather", 0.0, calls=3)
    assert pj.collective_time(calls, 8, latency) == pytest.approx(30e-6)
    assert pj.collective_time(calls, 16, latency) == pytest.approx(75e-6)
    assert pj.collective_time(gather, 1, links) == 0.0


def test_one_gpu_is_perfect_and_infinite_bandwidth_approaches_it():
    collectives = pj.zero_collectives(3, 228_051_752, gather_calls=181)
    one = pj.project(0.01, 64, 1, collectives)
    assert one.efficiency == 1.0 and one.comm_s == 0 and one.samples_per_s == pytest.approx(6400)
    fast = pj.Links(nvlink_gbs=1e12, ib_gbs=1e12, nvlink_latency_us=0, ib_latency_us=0)
    for world in (8, 64, 512):
        p = pj.project(0.01, 64, world, collectives, fast)
        assert 0.999999 < p.efficiency <= 1.0 and p.samples_per_s == pytest.approx(6400 * world, rel=1e-5)
    slow = [pj.project(0.01, 64, 64, collectives, pj.Links(ib_gbs=gbs)).efficiency for gbs in (12.5, 25, 50, 100)]
    assert slow == sorted(slow) and slow[-1] < 1  # more bandwidth, better efficiency


def test_overlap_and_sharded_optimizer():
    collectives = pj.zero_collectives(2, 228_051_752)
    none = pj.project(0.01, 64, 8, collectives, overlap=0.0)
    half = pj.project(0.01, 64, 8, collectives, overlap=0.5)
    full = pj.project(0.01, 64, 8, collectives, overlap=1.0)
    assert none.step_time_s == pytest.approx(0.01 + none.comm_s)
    assert half.step_time_s == pytest.approx(0.01 + none.comm_s / 2)
    assert full.step_time_s == pytest.approx(0.01) and full.efficiency == pytest.approx(1.0)
    sharded = pj.project(0.01, 64, 8, collectives, overlap=1.0, optimizer_time_s=0.002)
    assert sharded.step_time_s == pytest.approx(0.01 - 0.002 * 7 / 8)  # ZeRO >= 1: each rank updates 1/8
    ddp = pj.project(
        0.01, 64, 8, pj.zero_collectives(0, 228_051_752), overlap=1.0, optimizer_time_s=0.002, sharded_optimizer=False
    )
    assert ddp.step_time_s == pytest.approx(0.01)
    with pytest.raises(ValueError):
        pj.project(0.01, 64, 8, collectives, overlap=1.5)


def test_cli_prints_a_labelled_projection_for_8_and_64_gpus(capsys):
    assert pj.main([]) == 0
    text = capsys.readouterr().out
    assert text.startswith("PROJECTION, not a measurement") and "ASSUMED single-GPU step time" in text
    table = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "GPUs" not in line]
    gpus = [int(cells[0]) for cells in table]
    assert gpus.count(1) == 1 and gpus.count(8) == 8 and gpus.count(64) == 8  # 4 stages x overlap 0, 0.5
    assert float(table[0][6]) == 1.0  # one GPU: efficiency 1
    assert pj.main(["--step-time-ms", "20", "--gpus", "8", "--stages", "2"]) == 0
    assert "MEASURED single-GPU step time 20 ms (given)" in capsys.readouterr().out


def test_send_factors_of_the_logged_messages():
    assert scaling.sent_bytes({"all_reduce": 100}, 4) == 150
    assert scaling.sent_bytes({"all_gather_into_tensor | [Caller Func: allgather_fn]": 100}, 4) == 300  # a shard
    assert scaling.sent_bytes({"reduce_scatter_tensor": 100, "reduce": 100, "broadcast": 100}, 4) == 225
    with pytest.raises(ValueError):
        scaling.sent_bytes({"mystery_op": 1}, 2)


# ---------------------------------------------------------------------------------- 2 CPU ranks, DeepSpeed


@pytest.mark.slow
@pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed")
def test_two_cpu_ranks_send_the_analytic_bytes(scaling_runs):
    """benchmarks/README.md's two CPU forms (tests/conftest.py's scaling_runs): 1 rank at ZeRO 0 / 1, then 2 ranks."""
    out = scaling_runs["out"] / "scaling.jsonl"
    logs = "\n".join(
        f"{r['argv']}: exit {r['proc'].returncode}\n{r['proc'].stdout[-3000:]}" for r in scaling_runs["runs"]
    )
    everything = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    ones, rows = [r for r in everything if r["world_size"] == 1], [r for r in everything if r["world_size"] == 2]
    assert [(r["zero_config"], r["zero_stage"]) for r in ones] == [
        (c, s) for c in ("engine", "textbook") for s in (0, 1)
    ]
    assert len(rows) == 8, logs
    assert [(r["zero_config"], r["zero_stage"]) for r in rows] == [
        (c, s) for c in ("engine", "textbook") for s in range(4)
    ]
    for row in rows:  # against the 1-rank row of the same config, where there is one
        base = {(r["zero_config"], r["zero_stage"]): r for r in ones}.get((row["zero_config"], row["zero_stage"]))
        if base is None:
            assert row["scaling_efficiency"] is None and row["efficiency_baseline"] is None
        else:
            want = row["samples_per_s_per_gpu"] / base["samples_per_s_per_gpu"]
            assert row["scaling_efficiency"] == pytest.approx(want, rel=1e-12)
            assert row["efficiency_baseline"]["samples_per_s_per_gpu"] == base["samples_per_s_per_gpu"]
    for row in rows:
        assert row["world_size"] == 2 and row["measured_on"] == "cpu" and row["device"] == "cpu"
        assert "not GPU numbers" in row["note"] and row["commit"] and row["torch"] and row["deepspeed"]
        assert len(row["per_rank"]) == 2 and row["samples_per_s"] == pytest.approx(2 * row["samples_per_s_per_gpu"])
        # DeepSpeed's logger and the torch.distributed counter saw the same traffic
        assert row["sent_bytes_logger"] == pytest.approx(row["sent_bytes_torch"], rel=1e-9)
        assert row["params"] > 1e6 and row["tied_params"] == 30522 * 32  # the word embeddings / MLM decoder
        if row["zero_config"] == "textbook" or row["zero_stage"] < 3:
            # textbook: 2 Psi b (N-1)/N for ZeRO-0/1/2 and (3 Psi + 2 T) b (N-1)/N for ZeRO-3; the engine's
            # DeepSpeed defaults: ZeRO-1/2 all-reduce the gradients, 3 Psi b (N-1)/N
            assert row["logger_over_analytic"] == pytest.approx(1.0, abs=BYTES_TOL), row["zero_config"]
        else:
            # ZeRO-3 with DeepSpeed's defaults: what the forward gathered stays for the backward (reuse distance)
            assert row["logger_over_analytic"] < 1.0
    by = {(r["zero_config"], r["zero_stage"]): r["sent_bytes_logger"] for r in rows}
    assert by["textbook", 3] == pytest.approx(
        by["textbook", 2] * (3 * rows[0]["params"] + 2 * rows[0]["tied_params"]) / (2 * rows[0]["params"]),
        rel=BYTES_TOL,
    )
    assert by["engine", 1] == pytest.approx(1.5 * by["textbook", 1], rel=BYTES_TOL)
    ports = [r["argv"][r["argv"].index("--master_port") + 1] for r in scaling_runs["runs"]]
    for port in ports:  # DeepSpeed's CPU shared-memory op stays off: nothing left in RAM after the jobs
        assert not list(Path("/dev/shm").glob(f"deepspeed_*_{port}_*"))
    table = out.with_suffix(".md").read_text()
    assert "CPU ranks" in table and "NOT GPU numbers" in table and table.count("\n| ") == 1 + len(rows)
