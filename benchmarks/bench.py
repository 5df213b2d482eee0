#!/usr/bin/env python
"""tp-siglip vs transformers' ``SiglipVisionModel``: one command, one markdown table, same weights.

Every number comes from this run on this machine; nothing is copied from elsewhere. Both encoders are
loaded from the same random-weight checkpoint, built with transformers (``SiglipVisionModel`` +
``save_pretrained``) in a temporary directory deleted at the end. All forwards run under
``torch.inference_mode()``. This file is the command line; each section lives in its own module:

throughput (throughput.py)
    Images per second, ours (one rank, every intra-op thread) vs transformers (sdpa) in the same
    process: base-224 and so400m-384, fp32 and bf16, batch 1/8/32 (so400m batch 32 only with
    ``--so400m-b32``), interleaved timed forwards, medians, outputs compared, GFLOP/s against a matmul
    ceiling timed around each cell. Also ``torch.compile``-d ours unless ``--no-compile``.
scaling (scaling.py)
    The same cores as 1 rank x N threads vs 2 ranks x N/2 threads, tensor mode and data mode,
    base-224, batch 8, fp32 and bf16; spawned ranks over gloo, timed round-robin.
memory (memory.py)
    so400m-384 (27 layers): load time, parameter bytes and peak RSS growth of ``from_pretrained`` at 1
    rank and per rank at 2 ranks, and of transformers, each in fresh processes.
fused (fused_qkv.py; only when named in ``--only``)
    Today's fused q/k/v GEMM vs the three GEMMs it replaced, on the same weights: base-224 and
    so400m-384 (4 layers), batch 8, fp32 and bf16, at 1 rank and 2 tensor-parallel ranks.

Shared pieces: common.py (geometries, FLOPs, timing, output comparison), checkpoints.py, options.py
(the options below and the run plan), ranks.py (spawned rank groups), table.py, machine.py.

Targets ("target" / "met?" columns): ours at 1 rank >= 1.05x transformers in fp32 and >= 1.2x in bf16
(CPU); 2 ranks x N/2 threads >= 0.9x of 1 rank x N threads; at 2 ranks each rank holds <= 0.55x the
parameter bytes and grows its peak RSS while loading by <= 0.6x of what 1 rank does.

``--device cuda`` measures so400m-384 batch 64 bf16 on the GPU (ours vs transformers, plus the bf16
matmul ceiling of that GPU); scaling runs over NCCL when there are at least 2 GPUs and is skipped
otherwise. No CUDA graphs.

Usage::

    python benchmarks/bench.py                      # throughput, scaling, memory (CPU); ~25 min on 2 cores
    python benchmarks/bench.py --quick              # smoke run: 1-2 layers, batch 1/2, 1 iteration
    python benchmarks/bench.py --only throughput --so400m-b32 --json out.json
    python benchmarks/bench.py --only fused         # or: python benchmarks/fused_qkv.py; ~5 min on 2 idle cores
    python benchmarks/bench.py --device cuda
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable (also in spawned ranks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import fused_qkv, memory, scaling, throughput
from benchmarks.checkpoints import Checkpoints
from benchmarks.common import START, log, offline_hub
from benchmarks.machine import header, load_average, machine_info
from benchmarks.options import SECTIONS, Options, estimate_seconds, parse_options
from benchmarks.table import Row, markdown

NOTES = {
    "throughput": throughput.NOTES,
    "scaling": scaling.NOTES,
    "memory": memory.NOTES,
    "fused": fused_qkv.NOTES,
}


def run_section(section: str, opts: Options, checkpoints: Checkpoints, workdir: Path, rows: list[Row]) -> None:
    if section == "throughput":
        throughput.run_throughput(opts, checkpoints, rows)
    elif section == "scaling":
        scaling.run_scaling(opts, checkpoints, workdir, rows)
    elif section == "memory":
        memory.run_memory(opts, checkpoints, workdir, rows)
    else:
        fused_qkv.run_fused(opts, checkpoints, workdir, rows)


def run_sections(opts: Options, tmpdir: Optional[Path]) -> tuple[list[Row], list[str]]:
    """Every chosen section in the usual order; a failing section adds a FAILED row and the run goes on."""
    root = Path(tempfile.mkdtemp(prefix="tp-siglip-bench-", dir=tmpdir))
    checkpoints = Checkpoints(root)
    rows: list[Row] = []
    failures: list[str] = []
    try:
        for section in (s for s in SECTIONS if s in opts.sections):
            try:
                run_section(section, opts, checkpoints, root, rows)
            except Exception:  # report, go on with the next section
                failures.append(f"{section}: {traceback.format_exc()}")
                log(f"{section} FAILED:\n{failures[-1]}")
                rows.append(Row(section, "", "", "", "FAILED (see stderr)", "", "", ""))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows, failures


def notes_for(opts: Options) -> list[str]:
    return [note for section in SECTIONS if section in opts.sections for note in NOTES[section]]


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    log(f"wrote {path}")


def main(argv: Optional[list[str]] = None) -> int:
    offline_hub()
    opts, args = parse_options(argv)
    torch.set_num_threads(opts.threads)
    info = machine_info(opts)
    print(header(info, opts), flush=True)
    estimate = estimate_seconds(opts) if opts.device.type == "cpu" else None
    if estimate is not None:
        log(f"estimated run time: ~{estimate / 60:.1f} min on this machine if it is otherwise idle")
    rows, failures = run_sections(opts, args.tmpdir)
    elapsed = time.perf_counter() - START
    info["load_average_end"] = load_average()
    notes = notes_for(opts)
    print()
    print(markdown(rows))
    print()
    for note in notes:
        print(f"- {note}")
    print(f"- total wall time {elapsed / 60:.1f} min" + (f" (estimated {estimate / 60:.1f} min)" if estimate else "")
          + f"; load average {info['load_average'][0]} at start, {info['load_average_end'][0]} at the end")
    if args.json:
        write_json(args.json, {
            "machine": info,
            "options": {k: (str(v) if isinstance(v, (torch.device, Path)) else v) for k, v in vars(args).items()},
            "rows": [asdict(r) for r in rows],
            "notes": notes,
            "wall_seconds": elapsed,
            "estimated_seconds": estimate,
            "failures": failures,
        })
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
