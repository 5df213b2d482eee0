#!/usr/bin/env python
"""GPU throughput of ours vs transformers: img/s, MFU against this machine's measured bf16 GEMM peak, peak memory.

    python benchmarks/gpu_throughput.py --device cuda --json out.json          # so400m-384 and base-224, bf16
    python benchmarks/gpu_throughput.py --device cpu --quick --json out.json   # the CPU rehearsal: 1 layer, batch 1/2
    python benchmarks/gpu_throughput.py --report out.json                      # peak-memory table of an earlier run

What runs: first the peak, a square bf16 GEMM (8192^3 on a GPU) timed after warm-up; its best rate is the MFU
yardstick. Then, for each geometry and batch (1/32/128), one cell per variant on the same input:
``transformers`` (sdpa, eager; its outputs are the reference), ``ours`` (eager), ``ours+graph`` (ours replayed
from a captured CUDA graph) and ``transformers+graph``; after every geometry's eager cells, a second pass times ``ours+compile``
(``torch.compile``, default mode), so that a slow compile or a cut-off still leaves the eager figures. Each cell:
warm-up forwards, then timed forwards (CUDA events on a GPU, the wall clock on a CPU), median reported; img/s =
batch / median; MFU = img/s x analytic FLOPs per image (`Geometry.flops_per_image`) / peak;
``torch.cuda.max_memory_allocated`` over the cell (weights of every loaded model included) and its growth over
the cell's start; the first output compared with eager transformers' (`common.parity`, bf16 bound 5e-2 of scale).

Choices: random-weight checkpoints written by transformers (`checkpoints.Checkpoints`), as in bench.py; ours
runs with ``check_finite`` on in eager cells (what a caller gets) and off while a graph is captured (the check
reads the input, which a capture forbids); a variant that cannot run (no CUDA for graphs, a capture or compile
error) gets a row saying why instead of numbers; compile is skipped once ``--budget-s`` seconds have passed.
Rows are printed (markdown, stdout) and the JSON rewritten as each cell finishes. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.checkpoints import Checkpoints, load_ours, load_theirs
from benchmarks.common import BASE_224, DTYPES, SO400M_384, Geometry, log, median, offline_hub, outputs_of, parity, pixels

COLUMNS = ("geometry", "batch", "variant", "img/s", "vs transformers", "TFLOP/s", "MFU", "peak GB", "+GB", "max abs diff")
#: in the order they run per batch (transformers first: its outputs are the reference; a capture that fails
#: and leaves the device unusable comes after ours' eager figures), then ours+compile in a second pass
VARIANTS = ("transformers", "ours", "ours+graph", "transformers+graph", "ours+compile")


@dataclass
class Plan:
    device: torch.device
    dtype_name: str
    geometries: list[Geometry]
    batches: list[int]
    warmup: int
    iters: int
    compile: bool
    budget_s: float
    peak_size: int
    json: Optional[Path] = None
    start: float = field(default_factory=time.perf_counter)


def mfu(images_per_s: float, flops_per_image: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: the analytic FLOP rate reached, as a fraction of the measured peak."""
    return images_per_s * flops_per_image / peak_flops_per_s


def gemm_flops(m: int, k: int, n: int) -> float:
    """FLOPs of an (m, k) x (k, n) matrix product, a multiply-add counted as 2."""
    return 2.0 * m * k * n


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> tuple[list[float], Any]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones, and the first result.

    On a GPU each call sits between two CUDA events on the current stream (one synchronize at the end); on a
    CPU the wall clock times each call."""
    first = fn()
    for _ in range(max(0, warmup - 1)):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times, first
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for begin, end in events:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [begin.elapsed_time(end) / 1e3 for begin, end in events], first


def measure_peak(device: torch.device, dtype: torch.dtype, size: int, iters: int = 20) -> dict[str, Any]:
    """The square GEMM ``size^3`` at ``dtype``: best and median TFLOP/s of ``iters`` timed products."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    with torch.inference_mode():
        # ~70 ms of warm-up products on a GPU, so the clocks have risen before the timed ones
        times, _ = time_calls(lambda: a @ b, device, warmup=50 if device.type == "cuda" else 3, iters=iters)
    flops = gemm_flops(size, size, size)
    return {"shape": [size, size, size], "dtype": str(dtype), "iters": iters,
            "best_tflops": flops / min(times) / 1e12, "median_tflops": flops / median(times) / 1e12}


def capture_graph(fn: Callable[[Any], Any], x: torch.Tensor) -> Callable[[], Any]:
    """``fn(x)`` captured into a CUDA graph over a static copy of ``x``; the returned callable replays it and
    hands back the graph's (static) outputs. Raises RuntimeError where graphs cannot run (no CUDA)."""
    if x.device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA device")
    static = x.clone()
    stream = torch.cuda.Stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):  # warm-up on a side stream, as the capture needs
        for _ in range(2):
            fn(static)
    torch.cuda.current_stream(x.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)

    def replay() -> Any:
        graph.replay()
        return out

    replay.graph = graph  # type: ignore[attr-defined]  # keeps the graph (and its memory pool) alive with replay
    return replay


def memory_mark(device: torch.device) -> int:
    """Bytes allocated now, with the peak counter reset (0 on a CPU: no allocator statistics there)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def memory_peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def variant_call(name: str, models: dict[str, Any], x: torch.Tensor) -> Callable[[], Any]:
    """The callable one variant times (a graph is captured here, outside the timed calls)."""
    if name == "ours":
        return lambda: models["ours"](x)
    if name == "transformers":
        return lambda: models["theirs"](pixel_values=x)
    if name == "ours+compile":
        return lambda: models["compiled"](x)
    if name == "ours+graph":
        ours = models["ours"]
        ours.check_finite = False  # the check reads the input: no host sync is allowed inside a capture
        try:
            return capture_graph(lambda s: ours(s), x)
        finally:
            ours.check_finite = True
    if name == "transformers+graph":
        return capture_graph(lambda s: models["theirs"](pixel_values=s), x)
    raise ValueError(f"unknown variant {name!r}")


def run_cell(plan: Plan, geometry: Geometry, batch: int, name: str, models: dict[str, Any],
             reference: Optional[dict], theirs_ips: Optional[float], peak_tflops: float) -> dict[str, Any]:
    """One (geometry, batch, variant) cell: its numbers, or ``error`` saying why it could not run."""
    device, dtype = plan.device, DTYPES[plan.dtype_name]
    x = pixels(batch, geometry.image, seed=1000 + batch, device=device).to(dtype)
    cell: dict[str, Any] = {"geometry": geometry.label, "batch": batch, "variant": name, "dtype": plan.dtype_name}
    start_bytes = memory_mark(device)
    began = time.perf_counter()
    try:
        with torch.inference_mode():
            times, first = time_calls(variant_call(name, models, x), device, plan.warmup, plan.iters)
            outputs = outputs_of(first)
    except Exception as error:  # a variant that cannot run here is a row that says why, not a failed run
        cell["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
        log(f"{geometry.label} b{batch} {name}: not run ({cell['error']})")
        return cell
    ips = batch / median(times)
    flops = geometry.flops_per_image()
    cell.update(seconds=times, seconds_median=median(times), img_s=ips, flops_per_image=flops,
                tflops=ips * flops / 1e12, mfu=mfu(ips, flops, peak_tflops * 1e12), wall_s=time.perf_counter() - began,
                peak_bytes=memory_peak(device), start_bytes=start_bytes, outputs=outputs)
    cell["growth_bytes"] = cell["peak_bytes"] - start_bytes
    if theirs_ips:
        cell["vs_transformers"] = ips / theirs_ips
    if reference is not None:
        check = parity(outputs, reference, "bf16" if plan.dtype_name != "fp32" else "fp32", None)
        cell["parity"] = {k: v for k, v in check.items() if k != "text"}
        cell["diff_text"] = check["text"]
    log(f"{geometry.label} b{batch} {name}: {ips:.1f} img/s, MFU {cell['mfu']:.1%}, {cell['wall_s']:.1f}s")
    return cell


def row_text(cell: dict[str, Any]) -> str:
    """One markdown table row of a cell (``COLUMNS``)."""
    head = [cell["geometry"], str(cell["batch"]), cell["variant"]]
    if "error" in cell:
        return "| " + " | ".join([*head, f"not run: {cell['error']}", *[""] * (len(COLUMNS) - 4)]) + " |"
    ratio = f"{cell['vs_transformers']:.2f}x" if "vs_transformers" in cell else ""
    gbs = [f"{cell['peak_bytes'] / 1e9:.2f}", f"{cell['growth_bytes'] / 1e9:.2f}"] if cell["peak_bytes"] else ["", ""]
    return "| " + " | ".join([*head, f"{cell['img_s']:.1f}", ratio, f"{cell['tflops']:.1f}", f"{cell['mfu']:.1%}",
                              *gbs, cell.get("diff_text", "(reference)")]) + " |"


def header_text() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def write_json(plan: Plan, report: dict[str, Any]) -> None:
    if plan.json is not None:
        cells = [{k: v for k, v in c.items() if k != "outputs"} for c in report["cells"]]
        plan.json.write_text(json.dumps({**report, "cells": cells}, indent=1))


def load_models(plan: Plan, path: Path) -> dict[str, Any]:
    """Ours and transformers (sdpa) from the same checkpoint; ``compiled`` wraps our very module."""
    dtype = DTYPES[plan.dtype_name]
    ours = load_ours(path, dtype, plan.device)
    theirs = load_theirs(path, dtype, plan.device)
    return {"ours": ours, "theirs": theirs, "compiled": torch.compile(ours) if plan.compile else None}


def eager_pass(plan: Plan, geometry: Geometry, models: dict[str, Any], report: dict[str, Any]) -> dict[int, tuple]:
    """Every batch's eager and graph cells; returns per batch (transformers' outputs, its img/s)."""
    refs: dict[int, tuple] = {}
    peak = report["peak"]["best_tflops"]
    for batch in plan.batches:
        theirs = run_cell(plan, geometry, batch, "transformers", models, None, None, peak)
        reference, ips = theirs.get("outputs"), theirs.get("img_s")
        refs[batch] = (reference, ips)
        for cell in (theirs, *(run_cell(plan, geometry, batch, name, models, reference, ips, peak)
                                for name in VARIANTS[1:4])):
            report["cells"].append(cell)
            print(row_text(cell), flush=True)
            write_json(plan, report)
        gc.collect()
    return refs


def compile_pass(plan: Plan, geometry: Geometry, models: dict[str, Any], refs: dict[int, tuple],
                 report: dict[str, Any]) -> None:
    """``ours+compile`` per batch while the time budget lasts (a compile per new batch shape)."""
    for batch in plan.batches:
        if time.perf_counter() - plan.start > plan.budget_s:
            cell = {"geometry": geometry.label, "batch": batch, "variant": "ours+compile",
                    "error": f"skipped: past the {plan.budget_s:.0f} s budget"}
        else:
            reference, ips = refs[batch]
            cell = run_cell(plan, geometry, batch, "ours+compile", models, reference, ips, report["peak"]["best_tflops"])
        report["cells"].append(cell)
        print(row_text(cell), flush=True)
        write_json(plan, report)


def run(plan: Plan) -> dict[str, Any]:
    device = plan.device
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": plan.dtype_name,
                              "plan": {k: str(v) for k, v in asdict(plan).items()}, "cells": []}
    report["peak"] = measure_peak(device, torch.bfloat16, plan.peak_size)
    log(f"bf16 GEMM peak {plan.peak_size}^3: {report['peak']['best_tflops']:.1f} TFLOP/s "
        f"(median {report['peak']['median_tflops']:.1f})")
    print(f"bf16 GEMM peak ({plan.peak_size}^3, best of {report['peak']['iters']}): "
          f"{report['peak']['best_tflops']:.1f} TFLOP/s; MFU below is against it.\n")
    print(header_text(), flush=True)
    write_json(plan, report)
    with tempfile.TemporaryDirectory(prefix="tp-siglip-gpu-") as tmp:
        checkpoints = Checkpoints(Path(tmp))
        loaded: list[tuple[Geometry, dict[str, Any], dict[int, tuple]]] = []
        for geometry in plan.geometries:
            models = load_models(plan, checkpoints.get(geometry))
            loaded.append((geometry, models, eager_pass(plan, geometry, models, report)))
        if plan.compile:
            for geometry, models, refs in loaded:
                compile_pass(plan, geometry, models, refs, report)
    return report


def memory_report(path: Path) -> str:
    """The peak-memory table (GB) of a JSON written by this script: one row per cell that has allocator figures."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c.get("peak_bytes")]
    lines = ["| geometry | batch | variant | peak allocated GB | growth over the cell GB |", "|---|---|---|---|---|"]
    lines += [f"| {c['geometry']} | {c['batch']} | {c['variant']} | {c['peak_bytes'] / 1e9:.2f} | "
              f"{c['growth_bytes'] / 1e9:.2f} |" for c in cells]
    if len(lines) == 2:
        lines.append("| (no allocator statistics: not a CUDA run) | | | | |")
    return "\n".join(lines)


def parse_plan(argv: Optional[list[str]] = None) -> tuple[Optional[Plan], argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", default="cuda")
    add("--dtype", default="bf16", choices=list(DTYPES))
    add("--geometries", default="so400m-384,base-224")
    add("--batches", default=None, help="comma-separated (default 1,32,128; --quick 1,2)")
    add("--layers", type=int, default=None, help="override every geometry's layer count (--quick: 1)")
    add("--warmup", type=int, default=None, help="untimed calls per cell (default 3; --quick 1)")
    add("--iters", type=int, default=None, help="timed calls per cell (default 10; --quick 2)")
    add("--no-compile", action="store_true", help="skip the ours+compile pass")
    add("--budget-s", type=float, default=150.0, help="no new compile after this many seconds")
    add("--peak-size", type=int, default=None, help="square GEMM size of the peak (default 8192; CPU 512)")
    add("--quick", action="store_true", help="the CPU rehearsal's sizes: 1 layer, batch 1/2, 1+2 calls")
    add("--json", type=Path, default=None)
    add("--report", type=Path, default=None, help="print the peak-memory table of this JSON and exit")
    args = parser.parse_args(argv)
    if args.report:
        return None, args
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    known = {g.name: g for g in (SO400M_384, BASE_224)}
    names = [n for n in args.geometries.split(",") if n]
    if unknown := [n for n in names if n not in known]:
        parser.error(f"--geometries: unknown {unknown}; choose from {list(known)}")
    layers = args.layers or (1 if args.quick else None)
    geometries = [replace(known[n], layers=layers) if layers else known[n] for n in names]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 2] if args.quick else [1, 32, 128])
    plan = Plan(device=device, dtype_name=args.dtype, geometries=geometries, batches=batches,
                warmup=args.warmup or (1 if args.quick else 3), iters=args.iters or (2 if args.quick else 10),
                compile=not args.no_compile, budget_s=args.budget_s, json=args.json,
                peak_size=args.peak_size or (8192 if device.type == "cuda" else 512))
    return plan, args


def main(argv: Optional[list[str]] = None) -> int:
    plan, args = parse_plan(argv)
    if plan is None:
        print(memory_report(args.report))
        return 0
    offline_hub()
    report = run(plan)
    failed = [c for c in report["cells"] if not c.get("parity", {"ok": True})["ok"]]
    print(f"\n{len(report['cells'])} cells; {len(failed)} outside the parity bound")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
