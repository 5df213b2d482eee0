"""Command-line options of bench.py and the plan they make: which cells run, how often, how long.

`parse_options` turns the arguments into an `Options` (geometries, dtypes, batches and iteration counts
per section, with ``--quick`` and ``--device cuda`` defaults applied); `estimate_seconds` predicts the
run's wall time from two short matmul probes, only to say "minutes, not hours" before starting.

Sections: ``throughput``, ``scaling`` and ``memory`` run by default; ``fused`` (fused q/k/v vs three
GEMMs, see fused_qkv.py) only when named in ``--only``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import BASE_224, DTYPES, GEOMETRIES, SO400M_384, Geometry, matmul_ceiling

SECTIONS = ("throughput", "scaling", "memory", "fused")
DEFAULT_SECTIONS = ("throughput", "scaling", "memory")
QUICK_LAYERS = {"base-224": 2, "so400m-384": 1}
#: the fused q/k/v section keeps so400m short on the CPU (the q/k/v share of a layer does not depend on depth)
FUSED_CPU_LAYERS = {"so400m-384": 4}
#: the fused section times at least this many interleaved pairs per cell (outside --quick / --iters)
FUSED_MIN_PAIRS = 5


@dataclass
class Options:
    device: torch.device
    threads: int
    quick: bool
    sections: tuple[str, ...]
    geometries: list[Geometry]
    dtypes: list[str]
    batches: list[int]
    so400m_b32: bool
    warmup: int
    min_iters: int
    max_iters: int
    fixed_iters: Optional[int]
    cell_seconds: float
    long_forward: float
    scaling_geometry: Geometry
    scaling_batch: int
    scaling_ranks: int
    memory_geometry: Geometry
    fused_geometries: list[Geometry]
    fused_batch: int
    compile: bool = False

    def iterations(self, seconds_per_round: float) -> int:
        """How many timed rounds a cell gets, from the cost of one round (all set-ups once)."""
        if self.fixed_iters is not None:
            return self.fixed_iters
        fit = int(self.cell_seconds // max(seconds_per_round, 1e-9))
        return max(self.min_iters, min(self.max_iters, fit))

    def warmup_rounds(self, batch: int, previous: Optional[tuple[int, float]]) -> int:
        """Warm-up forwards for a throughput cell: ``warmup``, or none when a smaller batch of the same
        models has already run (``previous``: its batch and seconds per round) and one forward here is
        predicted to take over ``long_forward`` seconds (there the first-call costs are lost in the noise,
        and a warm-up would cost a whole extra round)."""
        if previous is None:
            return self.warmup
        prev_batch, prev_pair = previous
        return 0 if prev_pair * batch / prev_batch / 2 > self.long_forward else self.warmup

    def throughput_cells(self) -> list[tuple[Geometry, str, int]]:
        cells = []
        for geometry in self.geometries:
            for dtype_name in self.dtypes:
                for batch in self.batches:
                    slow = geometry.name == "so400m-384" and batch >= 32 and not self.so400m_b32
                    if not (self.device.type == "cpu" and slow):
                        cells.append((geometry, dtype_name, batch))
        return cells


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="tp-siglip vs transformers SiglipVisionModel: throughput, TP scaling, load memory, fused q/k/v.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="smoke run: 1-2 layers, batch 1/2, 1 iteration (< 2 min)")
    add("--only", default=None, help=f"comma list of sections among {','.join(SECTIONS)} "
        f"(default: {','.join(DEFAULT_SECTIONS)})")
    add("--json", type=Path, default=None, metavar="PATH", help="also write the table (and raw data) here")
    add("--device", choices=("cpu", "cuda"), default="cpu")
    add("--threads", type=int, default=None, help="intra-op threads (default: torch's default)")
    add("--so400m-b32", action="store_true", help="include so400m-384 batch-32 cells on the CPU (slow)")
    add("--geometries", default=None, help="comma list among base-224,so400m-384 (throughput, fused)")
    add("--dtypes", default=None, help="comma list among fp32,bf16")
    add("--batches", default=None, help="comma list of batch sizes (throughput)")
    add("--fused-batch", type=int, default=None, help="batch of the fused section (default 8 on CPU, 64 on GPU)")
    add("--layers", type=int, default=None, help="override the number of layers of every geometry")
    add("--warmup", type=int, default=None, help="warm-up forwards per cell and model (>= 1)")
    add("--iters", type=int, default=None, help="fixed number of timed rounds per cell")
    add("--min-iters", type=int, default=3)
    add("--max-iters", type=int, default=10)
    add("--cell-seconds", type=float, default=12.0, help="timing budget per cell before --min-iters")
    add("--long-forward", type=float, default=10.0,
        help="no warm-up at a larger batch once one forward takes longer than this (s)")
    add("--tmpdir", type=Path, default=None, help="where the temporary checkpoints go")
    add("--no-compile", action="store_true", help="skip the extra 'ours + torch.compile' throughput rows")
    return parser


def _names(text: str, known: dict | tuple, what: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"{what}: unknown {unknown}; choose from {list(known)}")
    return names


def _resize(geometry: Geometry, args: argparse.Namespace, quick_layers: int) -> Geometry:
    """``geometry`` with ``--quick``'s and then ``--layers``' layer count applied."""
    if args.quick:
        geometry = replace(geometry, layers=quick_layers)
    return replace(geometry, layers=args.layers) if args.layers else geometry


def _geometries(args: argparse.Namespace, cuda: bool, parser: argparse.ArgumentParser) -> dict[str, object]:
    """Every section's geometries."""
    if args.geometries:
        chosen = [GEOMETRIES[n] for n in _names(args.geometries, GEOMETRIES, "--geometries", parser)]
    else:
        chosen = [SO400M_384] if cuda else [BASE_224, SO400M_384]
    fused = chosen if cuda else [replace(g, layers=FUSED_CPU_LAYERS.get(g.name, g.layers)) for g in chosen]
    return {
        "geometries": [_resize(g, args, QUICK_LAYERS[g.name]) for g in chosen],
        "fused_geometries": [_resize(g, args, QUICK_LAYERS[g.name]) for g in fused],
        "scaling_geometry": _resize(SO400M_384 if cuda else BASE_224, args, 2),
        "memory_geometry": _resize(SO400M_384, args, 2),
    }


def parse_options(argv: Optional[list[str]] = None) -> tuple[Options, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    cuda = device.type == "cuda"
    sections = DEFAULT_SECTIONS if args.only is None else tuple(_names(args.only, SECTIONS, "--only", parser))
    dtypes = _names(args.dtypes, DTYPES, "--dtypes", parser) if args.dtypes else (["bf16"] if cuda else ["fp32", "bf16"])
    if args.batches:
        batches = sorted({int(b) for b in args.batches.split(",")})
    else:
        batches = [1, 2] if args.quick else ([64] if cuda else [1, 8, 32])
    warmup = args.warmup if args.warmup is not None else (3 if cuda and not args.quick else 1)
    options = Options(
        device=device,
        threads=args.threads or torch.get_num_threads(),
        quick=args.quick,
        sections=sections,
        dtypes=dtypes,
        batches=batches,
        so400m_b32=args.so400m_b32,
        warmup=max(1, warmup),
        min_iters=1 if args.quick else args.min_iters,
        max_iters=1 if args.quick else max(args.min_iters, args.max_iters),
        fixed_iters=1 if args.quick and args.iters is None else args.iters,
        cell_seconds=args.cell_seconds,
        long_forward=args.long_forward,
        scaling_batch=2 if args.quick else (64 if cuda else 8),
        scaling_ranks=2,
        fused_batch=args.fused_batch or (2 if args.quick else (64 if cuda else 8)),
        compile=not args.no_compile,
        **_geometries(args, cuda, parser),
    )
    return options, args


def estimate_seconds(opts: Options) -> float:
    """A rough wall-clock estimate of the whole run on this CPU, from two short matmul probes.

    Assumes the models reach ~75 % (fp32) / ~60 % (bf16) of the probe and adds fixed costs for writing
    checkpoints, loading and spawning. Only meant to say "minutes, not hours"."""
    probe = {name: matmul_ceiling(1568, 768, 3072, DTYPES[name], opts.device, seconds=0.3)["best_gflops"] for name in DTYPES}
    speed = {"fp32": 0.75 * probe["fp32"] * 1e9, "bf16": 0.6 * probe["bf16"] * 1e9}
    written: set[Geometry] = set()

    def write_cost(g: Geometry) -> float:
        if g in written:
            return 0.0
        written.add(g)
        return 3.0 + g.param_count() * 4 / 60e6  # fill + save at ~60 MB/s on two cores

    total = 0.0
    if "throughput" in opts.sections:
        total += sum(write_cost(g) for g in opts.geometries)
        previous: dict[tuple[Geometry, str], tuple[int, float]] = {}
        for geometry, dtype_name, batch in opts.throughput_cells():
            pair = 2 * batch * geometry.flops_per_image() / speed[dtype_name]
            warmup = opts.warmup_rounds(batch, previous.get((geometry, dtype_name)))
            total += pair * (warmup + opts.iterations(pair)) + 2.0
            previous[(geometry, dtype_name)] = (batch, pair)
        total += sum(4.0 + 2 * g.param_count() * 4 / 0.8e9 for g in opts.geometries) * len(opts.dtypes)
    if "scaling" in opts.sections:
        g = opts.scaling_geometry
        total += write_cost(g) + 15.0
        for dtype_name in ("fp32", "bf16"):
            forward = opts.scaling_batch * g.flops_per_image() / speed[dtype_name]
            total += 3 * forward * (opts.warmup + opts.iterations(3 * forward)) + 5.0
    if "memory" in opts.sections:
        g = opts.memory_geometry
        total += write_cost(g) + 3 * 8.0 + 3 * g.param_count() * 4 / 0.8e9
    if "fused" in opts.sections:
        for g in opts.fused_geometries:
            total += write_cost(g)
            for dtype_name in opts.dtypes:  # two set-ups (1 rank, 2 ranks), each: warm pair + timed pairs + GEMMs
                pair = 2 * opts.fused_batch * g.flops_per_image() / speed[dtype_name]
                pairs = opts.iterations(pair) if opts.fixed_iters is not None else max(FUSED_MIN_PAIRS, opts.iterations(pair))
                total += 2 * (pair * (opts.warmup + pairs) + 4.0)
        total += 2 * 6.0  # spawning the two rank groups
    return total
