"""Every Triton kernel variant LXMERT launches, compiled for an H100 (sm_90) on a machine without a GPU.

    python -m benchmarks.kernels_sm90 [--jobs N] [--out runs/benchmarks/kernels_sm90.md] [--only TEXT]

What is reported and checked: benchmarks/README.md. How: Triton's active driver is replaced by a stub that reports
a CUDA sm_90 target and each kernel's launch becomes a warm-up (compile, do not run); the project's own launchers
are called with CPU tensors laid out as lxmert/ lays them out, so they decide the signature, specialisations,
constexprs and warps. Every kernel compiles in a fresh cache, in worker processes without TRITON_INTERPRET.
Registers and spills come from ptxas -v, local memory from cuobjdump, shared memory from Triton's metadata, the
tl.dot lowering from the TTGIR. Exit status 1 on any problem check() finds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
B, HEADS, HEAD_DIM = 256, 12, 64
N_LANG, N_VIS = 20, 36
FEATURES = 2048
MASKED_ROWS = (1382, 1376, 1)  # ~15% of 256 x 36 regions; 1376 % 16 == 0 and 1 are Triton's special cases
DROPOUT_P = 0.1
SEED = 123456789
DTYPES = ("fp32", "fp16", "bf16")

# H100 SXM (sm_90)
SM_COUNT, REGS_PER_SM, SMEM_PER_SM, SMEM_PER_BLOCK = 132, 65536, 228 * 1024, 227 * 1024
MAX_THREADS_PER_SM, MAX_CTAS_PER_SM, MAX_WARPS_PER_SM = 2048, 32, 64


@dataclass(frozen=True)
class Variant:
    kind: str  # attn_fwd | attn_bwd | bidir_fwd | bidir_bwd | dropout_mask | featreg
    dtype: str
    len_q: int = 0
    len_k: int = 0
    mask: bool = False  # attn: key mask; bidir: language mask
    vis_mask: bool = False  # bidir: region mask
    dropout: bool = False
    rows: int = 0  # featreg: masked rows
    use: str = ""  # what LXMERT runs it for: "train", "eval", "benchmark" (benchmarks/kernels.py) or ""
    head_dim: int = HEAD_DIM

    @property
    def name(self) -> str:
        if self.kind.startswith("attn"):
            dim = "" if self.head_dim == HEAD_DIM else f" D{self.head_dim}"
            return (
                f"{self.kind} {self.len_q}x{self.len_k}{dim} {'mask' if self.mask else 'nomask'} "
                f"{'drop' if self.dropout else 'nodrop'} {self.dtype}"
            )
        if self.kind.startswith("bidir"):
            return (
                f"{self.kind} {N_LANG}+{N_VIS} lmask={int(self.mask)} vmask={int(self.vis_mask)} "
                f"{'drop' if self.dropout else 'nodrop'} {self.dtype}"
            )
        if self.kind == "dropout_mask":
            return f"dropout_mask {self.len_q}x{self.len_k}"
        return f"featreg M{self.rows} F{FEATURES} {self.dtype}"


def variants() -> list[Variant]:
    """Training (dropout, backward) and evaluation (neither) of every attention the model runs, with the masks
    it may pass (language keys always masked; regions masked when a visual_attention_mask is given), every
    dtype the backend accepts on a GPU; the feature-regression kernel at several masked-row counts."""
    out: list[Variant] = []
    shapes = ((N_LANG, N_LANG), (N_VIS, N_VIS), (N_LANG, N_VIS), (N_VIS, N_LANG))  # self, self, cross, cross
    for dtype in (*DTYPES, "fp64"):
        for len_q, len_k in shapes:
            for mask in (False, True):
                for dropout in (False, True):
                    for kind in ("attn_fwd", "attn_bwd"):
                        typical = (len_q == len_k == N_LANG and mask) or (len_q == len_k == N_VIS)
                        use = ("train" if dropout else "eval" if kind == "attn_fwd" else "") if typical else ""
                        out.append(Variant(kind, dtype, len_q, len_k, mask, False, dropout, use=use))
        for lmask in (False, True):
            for vmask in (False, True):
                for dropout in (False, True):
                    for kind in ("bidir_fwd", "bidir_bwd"):
                        use = ("train" if dropout else "eval" if kind == "bidir_fwd" else "") if lmask else ""
                        out.append(Variant(kind, dtype, N_LANG, N_VIS, lmask, vmask, dropout, use=use))
        for rows in MASKED_ROWS:
            out.append(Variant("featreg", dtype, rows=rows, use="train"))
    for len_q, len_k in shapes:
        out.append(Variant("dropout_mask", "u8", len_q, len_k, dropout=True))
    for dtype in DTYPES:  # benchmarks/kernels.py's long problems, up to fused_attention's GPU limits
        for head_dim in (64,) if dtype == "fp32" else (64, 128):
            for kind in ("attn_fwd", "attn_bwd"):
                out.append(Variant(kind, dtype, 64, 64, True, use="benchmark", head_dim=head_dim))
    return out


# -------------------------------------------------------------------------------------- the compile worker

_WORKER: dict = {}


def _setup() -> None:
    """In a worker: Triton compiled (never interpreted), its driver a stub reporting sm_90, each kernel's launch
    a warm-up that keeps the compiled kernel."""
    if _WORKER:
        return
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(REPO))
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class Sm90Stub:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(Sm90Stub())
    knobs.nvidia.dump_ptxas_log = True
    from kernels import feature_regression as fr
    from kernels import fused_attention as fa

    if fa._INTERPRETED or fr._INTERPRETED:  # noqa: SLF001 (the modules' own flag)
        raise SystemExit("the kernels were imported interpreted")
    captured: list = []
    for kernel in (
        fa._attention_fwd_kernel,
        fa._attention_bwd_kernel,
        fa._bidirectional_fwd_kernel,
        fa._bidirectional_bwd_kernel,
        fa._dropout_mask_kernel,
        fr._feature_regression_fwd_kernel,
    ):

        def run(*args, grid, warmup, _kernel=kernel, **kwargs):
            compiled = JITFunction.run(_kernel, *args, grid=grid, warmup=True, **kwargs)
            captured.append((_kernel.fn.__name__, tuple(grid), compiled))
            return compiled

        kernel.run = run
    bin_dir = Path(knobs.__file__).parent / "backends" / "nvidia" / "bin"
    _WORKER.update(torch=torch, fa=fa, fr=fr, captured=captured, bin=bin_dir)


def _launch(v: Variant) -> None:
    """Call the project's launcher for one variant with the model's layouts (nothing runs: see _setup)."""
    torch, fa, fr = _WORKER["torch"], _WORKER["fa"], _WORKER["fr"]
    drop, seed = (DROPOUT_P, torch.tensor([SEED])) if v.dropout else (0.0, None)  # the seed: int64 [1], loaded
    if v.kind == "dropout_mask":
        fa.dropout_keep_mask(SEED, B, HEADS, v.len_q, v.len_k, DROPOUT_P, "cpu")
        return
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[v.dtype]
    if v.kind == "featreg":
        n = B * N_VIS
        pred = torch.empty(v.rows, FEATURES, dtype=dt)  # F.linear's output in the compute dtype
        target = torch.empty(n, FEATURES, dtype=torch.float32)  # the batch widens features to fp32
        rows = torch.arange(v.rows, dtype=torch.int64) * (n // v.rows)
        fr._loss_and_unit_grad(pred, target, rows, torch.zeros(n), 1 / 0.15 / (n * FEATURES))
        return
    scale = 1.0 / math.sqrt(v.head_dim)

    def heads(length: int):  # Attention's views of one [B, L, 3, H, D] projection
        return torch.empty(B, length, 3, HEADS, v.head_dim, dtype=dt).permute(2, 0, 3, 1, 4).unbind(0)

    def key_mask(length: int, on: bool):
        return torch.ones(B, length, dtype=torch.bool) if on else None

    def grad_out(length: int):  # the gradient of an output laid out [B, L, H, D]
        return torch.empty(B, length, HEADS, v.head_dim, dtype=dt).transpose(1, 2)

    if v.kind.startswith("attn"):
        q, k, vv = heads(v.len_q) if v.len_q == v.len_k else (heads(v.len_q)[0], *heads(v.len_k)[1:])
        mask = key_mask(v.len_k, v.mask)
        if v.kind == "attn_fwd":
            fa._attention_fwd(q, k, vv, mask, scale, drop, seed)
        else:
            fa._attention_bwd(q, k, vv, mask, grad_out(v.len_q), scale, drop, seed)
        return
    q, k, vv = heads(N_LANG + N_VIS)  # the cross layer projects [language; regions] once
    lang, vis = tuple(t[:, :, :N_LANG] for t in (q, k, vv)), tuple(t[:, :, N_LANG:] for t in (q, k, vv))
    lmask, vmask = key_mask(N_LANG, v.mask), key_mask(N_VIS, v.vis_mask)
    if v.kind == "bidir_fwd":
        fa._bidirectional_fwd(lang, vis, lmask, vmask, scale, drop, seed)
    else:
        fa._bidirectional_bwd(lang, vis, lmask, vmask, grad_out(N_LANG), grad_out(N_VIS), scale, drop, seed)


def _dots(ttgir: str) -> list[str]:
    """How each tl.dot lowered: 'MxN:wgmma' (Hopper), ':mma' (mma.sync) or ':fma' (no tensor cores)."""
    encodings = {}
    for m in re.finditer(r"^#(\w+) = #ttg\.(\w+)<\{(.*)\}>", ttgir, re.M):
        name, kind, body = m.groups()
        if kind == "nvidia_mma":
            major = re.search(r"versionMajor = (\d+)", body).group(1)
            encodings[name] = {"3": "wgmma", "2": "mma"}.get(major, f"mma_v{major}")
        else:
            encodings[name] = "fma" if kind == "blocked" else kind
    found = []
    for line in ttgir.splitlines():
        if re.search(r"= (tt\.dot|ttng\.warp_group_dot) ", line):
            result = re.search(r"->\s*tensor<(\d+)x(\d+)x\w+,\s*#(\w+)", line)
            lowering = "wgmma" if "warp_group_dot" in line else encodings.get(result.group(3), result.group(3))
            found.append(f"{result.group(1)}x{result.group(2)}:{lowering}")
    return found


def occupancy(regs: int, smem: int, warps: int, programs: int) -> dict:
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp in units of 256
    limits = dict(regs=REGS_PER_SM // (regs_per_warp * warps), smem=SMEM_PER_SM // (smem + 1024))
    limits.update(threads=MAX_THREADS_PER_SM // (warps * 32), ctas=MAX_CTAS_PER_SM)
    ctas = min(limits.values())
    limit = "/".join(k for k, n in limits.items() if n == ctas)
    return dict(
        ctas_per_sm=ctas,
        limit=limit,
        occupancy=ctas * warps / MAX_WARPS_PER_SM,
        waves=programs / max(ctas * SM_COUNT, 1),
    )


def compile_variant(v: Variant) -> dict:
    _setup()
    captured = _WORKER["captured"]
    captured.clear()
    row: dict = {"variant": asdict(v), "name": v.name}
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            _launch(v)
    except Exception as error:  # noqa: BLE001 (a compile error is a result)
        row.update(status="refused" if v.dtype == "fp64" else "FAIL", error=f"{type(error).__name__}: {error}")
        return row
    row["compile_s"] = time.perf_counter() - start
    ((kernel, grid, compiled),) = captured
    md = compiled.metadata
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [str(_WORKER["bin"] / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True
        ).stdout
    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    ptxas = log.getvalue()

    def number(pattern: str) -> int:
        m = re.search(pattern, ptxas)
        return int(m.group(1)) if m else 0

    regs = number(r"Used (\d+) registers") or (int(res.group(1)) if res else 0)
    row.update(kernel=kernel, grid=list(grid), hash=compiled.hash, num_warps=md.num_warps, num_stages=md.num_stages)
    row.update(shared=md.shared, regs=regs, spill_stores=number(r"(\d+) bytes spill stores"))
    row.update(spill_loads=number(r"(\d+) bytes spill loads"), local=int(res.group(4)) if res else None)
    row.update(dots=_dots(compiled.asm["ttgir"]), occupancy=occupancy(regs, md.shared, md.num_warps, math.prod(grid)))
    problems = []
    if row["spill_stores"] or row["spill_loads"] or row["local"]:
        problems.append(f"spills {row['spill_stores']} / {row['spill_loads']} B, local {row['local']} B")
    if md.shared > SMEM_PER_BLOCK:
        problems.append(f"shared memory {md.shared} B > {SMEM_PER_BLOCK} B")
    row["status"] = "SPILL" if problems else "ok"
    row["error"] = "; ".join(problems) or None
    return row


# -------------------------------------------------------------------------------------------------- report


def check(rows: list[dict]) -> list[str]:
    """What fails the check (empty: all good)."""
    problems = []
    for r in rows:
        v = r["variant"]
        if v["dtype"] == "fp64" and v["kind"] not in ("dropout_mask", "featreg"):  # attention: gradcheck's only
            if r["status"] != "refused" or "interpreter" not in (r.get("error") or ""):
                problems.append(f"{r['name']}: fp64 must be refused on a GPU (got {r['status']})")
        elif r["status"] != "ok":
            problems.append(f"{r['name']}: {r['status']} {r.get('error') or ''}".strip())
    for dtype in DTYPES:
        hashes = {r.get("hash") for r in rows if r["variant"]["kind"] == "featreg" and r["variant"]["dtype"] == dtype}
        if len(hashes) != 1:
            problems.append(f"featreg {dtype}: {len(hashes)} binaries for the masked-row counts {MASKED_ROWS}")
    return problems


def markdown(rows: list[dict], problems: list[str]) -> str:
    from benchmarks.harness import environment

    env = environment()
    lines = [
        "# Triton kernels compiled for sm_90 (H100), no GPU",
        "",
        f"Compiled on {env['device']} (no GPU: a compile, not a run) with triton {env['triton']}, torch {env['torch']}, "  # noqa: E501
        f"commit {env['commit']}, {env['date']}.",
        "",
        f"`python -m benchmarks.kernels_sm90`: every variant LXMERT's launchers produce at B {B}, {HEADS} heads of "
        f"{HEAD_DIM}, {N_LANG} tokens, {N_VIS} regions, {FEATURES}-d features (method: the module docstring). "
        "Registers, spills and shared memory are the compiler's; occupancy is an estimate (H100 SXM limits); "
        "nothing here ran on a GPU.",
        "",
        "| variant | LXMERT use | status | warps/stages | regs | spill st/ld B | smem B | tl.dot lowering | "
        "CTAs/SM (limit) | occ | waves |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        v = r["variant"]
        if r["status"] not in ("ok", "SPILL"):
            lines.append(
                f"| {r['name']} | {v['use'] or '-'} | {r['status']}: {(r.get('error') or '')[:90]} |" + " |" * 8
            )
            continue
        o = r["occupancy"]
        dots = " ".join(sorted(set(r["dots"]), key=r["dots"].index)) or "-"
        lines.append(
            f"| {r['name']} | {v['use'] or '-'} | {r['status']} | {r['num_warps']}/{r['num_stages']} | {r['regs']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {dots} | {o['ctas_per_sm']} ({o['limit']}) | "
            f"{o['occupancy']:.0%} | {o['waves']:.2f} |"
        )
    lines += ["", "Check: " + ("passed" if not problems else "FAILED"), *[f"- {p}" for p in problems]]
    return "\n".join(lines) + "\n"


def run(selected: list[Variant], jobs: int) -> list[dict]:
    import multiprocessing

    with tempfile.TemporaryDirectory(prefix="triton-sm90-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every variant compiles (and logs ptxas)
        os.environ.pop("TRITON_INTERPRET", None)
        cost = {v: (4 if v.dtype == "fp32" else 1) * (3 if v.kind.endswith("bwd") else 1) for v in selected}
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {v: pool.submit(compile_variant, v) for v in sorted(selected, key=lambda v: -cost[v])}
            return [futures[v].result() for v in selected]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels_sm90", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=max(1, len(os.sched_getaffinity(0))))
    parser.add_argument("--only", help="only the variants whose name contains this text")
    out = REPO / "runs" / "benchmarks" / "kernels_sm90.md"
    parser.add_argument("--out", type=Path, default=out, help="the Markdown table; the rows as JSON beside it (.json)")
    args = parser.parse_args(argv)
    selected = [v for v in variants() if not args.only or args.only in v.name]
    start = time.perf_counter()
    rows = run(selected, args.jobs)
    problems = check(rows) if not args.only else [p for p in check(rows) if "binaries" not in p]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, problems))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    ok = sum(r["status"] == "ok" for r in rows)
    print(
        f"{len(rows)} variants in {time.perf_counter() - start:.0f} s: {ok} compiled clean; "
        f"{len(problems)} problems; {args.out}"
    )
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
