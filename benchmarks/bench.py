#!/usr/bin/env python
"""tp-siglip vs transformers' ``SiglipVisionModel``: one script, one markdown table, same weights.

Every number comes from this run on this machine; nothing is copied from elsewhere. Both encoders are
loaded from the same random-weight checkpoint, which is built once with transformers (``SiglipVisionModel``
+ ``save_pretrained``) in a temporary directory and deleted at the end. All forwards run under
``torch.inference_mode()``.

Sections (``--only`` picks some; each adds rows to the one table):

throughput
    Images per second, ours (one rank, every intra-op thread) vs transformers (``attn_implementation=
    "sdpa"``, its default, checked on the loaded model), in the same process: base-224 (768 hidden, 3072
    MLP, 12 layers, 12 heads, patch 16, with head) and so400m-384 (1152, 4304, 27 layers, 16 heads, patch
    14, with head), fp32 and bf16, batch 1/8/32 (so400m batch 32 only with ``--so400m-b32``). Per cell:
    warm-up forwards of both, then timed forwards interleaved ours, transformers, ours, transformers,
    ...; medians are reported. The number of timed pairs adapts to the cell's cost (``--cell-seconds``,
    at least ``--min-iters``); a cell whose single forward is predicted (from the previous batch) to take
    over ``--long-forward`` seconds skips its warm-up, the models being warm from the smaller batch. The
    first outputs of both models in each cell are compared (max abs difference in the table; in bf16
    also each model against transformers' fp32 outputs on the same input).
    Achieved GFLOP/s (analytic, see `Geometry.flops_per_image`) is shown as a fraction of a matmul ceiling
    timed in the same run just before and just after the cell (the higher is kept): ``F.linear`` at the
    model's largest GEMM, ``(B*T, D) @ (D, F)``, same dtype, same threads.
scaling
    A fixed number of cores N (default: all threads of this process): 1 rank x N threads vs 2 ranks x N/2
    threads in tensor mode and in data mode, base-224, batch 8, fp32 and bf16. Ranks are spawned with
    torch.multiprocessing and joined by gloo through a ``file://`` store in the temporary directory. The
    three set-ups stay alive side by side and are timed in turn (round-robin); every timed forward is
    bracketed by barriers and timed on rank 0. Rank 0's outputs are compared with the 1-rank ones.
memory
    so400m-384 with all 27 layers (fp32 checkpoint ~1.7 GB): our ``from_pretrained`` at 1 rank and at 2
    ranks (tensor mode) and transformers' ``SiglipVisionModel.from_pretrained`` at 1 process, each rank in
    a fresh spawned process. Per rank: load time, bytes of parameters held, and peak RSS growth while
    loading = ``VmHWM`` after loading minus ``VmRSS`` just before (``/proc/self/status``). Before the
    baseline each process loads a tiny checkpoint once (so lazy imports are not counted) and, where the
    kernel allows it, resets its high-water mark through ``/proc/self/clear_refs``. transformers 5 keeps
    same-dtype safetensors weights memory-mapped (read at first use), so extra rows also time one read of
    every parameter after loading and the peak RSS growth including it.

Targets ("target" / "met?" columns): ours at 1 rank >= 1.05x transformers in fp32 and >= 1.2x in bf16
(CPU); 2 ranks x N/2 threads >= 0.9x of 1 rank x N threads; at 2 ranks each rank holds <= 0.55x the
parameter bytes and grows its peak RSS while loading by <= 0.6x of what 1 rank does.

``--device cuda`` measures so400m-384 batch 64 bf16 on the GPU (ours vs transformers, plus the bf16
matmul ceiling of that GPU); scaling runs over NCCL when there are at least 2 GPUs and is skipped
otherwise. No CUDA graphs.

Usage::

    python benchmarks/bench.py                      # everything (CPU); ~11-13 min on 2 quiet cores
    python benchmarks/bench.py --quick              # smoke run: 1-2 layers, batch 1/2, 1 iteration
    python benchmarks/bench.py --only throughput --so400m-b32 --json out.json
    python benchmarks/bench.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

try:  # a source checkout without `pip install -e .`
    import tp_siglip  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every checkpoint here is a local directory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SECTIONS = ("throughput", "scaling", "memory")
START = time.perf_counter()


# ============================================================================ geometry and FLOPs


@dataclass(frozen=True)
class Geometry:
    """A SigLIP vision tower's shape (transformers' config names in `hf_config`)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    patch: int
    image: int
    channels: int = 3
    head: bool = True

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def label(self) -> str:
        full = FULL_LAYERS.get(self.name)
        return self.name if full == self.layers else f"{self.name} ({self.layers}L)"

    def hf_config(self) -> dict[str, Any]:
        return dict(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            patch_size=self.patch,
            image_size=self.image,
            num_channels=self.channels,
            vision_use_head=self.head,
        )

    def flops_per_image(self) -> float:
        """Forward FLOPs for one image, counting a multiply-add as 2 FLOPs.

        With ``T = (image / patch)**2`` tokens, ``D`` hidden, ``F`` MLP width, ``L`` layers, ``C``
        channels and ``P`` patch size::

            patch conv   2*T*(C*P*P)*D
            each layer   2*T*(4*D*D + 2*D*F)          q, k, v, out projections; fc1, fc2
                       + 4*T*T*D                      Q K^T and softmax(.) V over all heads
            head         2*(D*D + 2*T*D*D + D*D + 2*D*F) + 4*T*D
                         (probe query, keys/values of all T tokens, out_proj, MLP on the one pooled
                         token, and its attention over T tokens)
            total        conv + L*layer + head

        Element-wise work (layer norms, GELU, softmax, bias and residual adds, position table) is
        left out: it is well under 1 % of the total for these geometries.
        """
        t, d, f = self.tokens, self.hidden, self.intermediate
        conv = 2 * t * (self.channels * self.patch * self.patch) * d
        layer = 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d
        head = 2 * (d * d + 2 * t * d * d + d * d + 2 * d * f) + 4 * t * d if self.head else 0
        return float(conv + self.layers * layer + head)

    def param_count(self) -> int:
        d, f, c, p = self.hidden, self.intermediate, self.channels, self.patch
        layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        head = (d + 3 * d * d + 3 * d + d * d + d + 2 * d + d * f + f + f * d + d) if self.head else 0
        return (c * p * p * d + d) + self.tokens * d + self.layers * layer + 2 * d + head


BASE_224 = Geometry("base-224", 768, 3072, 12, 12, 16, 224)
SO400M_384 = Geometry("so400m-384", 1152, 4304, 27, 16, 14, 384)
GEOMETRIES = {g.name: g for g in (BASE_224, SO400M_384)}
FULL_LAYERS = {g.name: g.layers for g in GEOMETRIES.values()}
#: used only to trigger lazy imports before a memory baseline
PRIMER = Geometry("primer", 64, 128, 1, 4, 8, 32)


# ============================================================================ small helpers


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def pixels(batch: int, image: int, seed: int, device: torch.device) -> torch.Tensor:
    """A fixed fp32 batch (what an image processor hands over); each model casts it to its dtype."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image, image, generator=gen).to(device)


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM (and RssAnon / RssFile where the kernel has them) of this process, in bytes."""
    text = Path("/proc/self/status").read_text()
    found = {}
    for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        found[key] = int(match.group(1)) * 1024 if match else 0
    return found


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    status = proc_status()
    return status["VmHWM"] <= status["VmRSS"] + (1 << 20)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def median(values: list[float]) -> float:
    return statistics.median(values)


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ============================================================================ checkpoints


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights with sane scales: matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.1),
    other vectors N(0, 0.02). No tensor is constant, so a mixed-up load cannot agree by luck."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if param.dim() >= 2:
            param.normal_(0.0, param[0].numel() ** -0.5, generator=gen)
        elif "norm" in name and name.endswith("weight"):
            param.normal_(1.0, 0.1, generator=gen)
        else:
            param.normal_(0.0, 0.02, generator=gen)


def write_checkpoint(geometry: Geometry, directory: Path, seed: int = 0) -> Path:
    """Build transformers' SiglipVisionModel for ``geometry`` with random weights; save_pretrained it.

    The model is built on the meta device and filled once (transformers' own init of 400M parameters
    costs half a minute on two cores and is thrown away anyway)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    quiet_transformers()
    with torch.device("meta"):
        model = SiglipVisionModel(SiglipVisionConfig(**geometry.hf_config()))
    model.to_empty(device="cpu")
    fill_random_(model, seed)
    model.save_pretrained(directory)
    del model
    gc.collect()
    return directory


class Checkpoints:
    """Checkpoints written once per geometry into one temporary directory, dropped by `close`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[Geometry, Path] = {}

    def get(self, geometry: Geometry) -> Path:
        if geometry not in self.paths:
            directory = self.root / f"ckpt-{geometry.name}-{geometry.layers}L"
            start = time.perf_counter()
            write_checkpoint(geometry, directory)
            size = sum(f.stat().st_size for f in directory.iterdir())
            log(f"wrote {geometry.label} checkpoint ({gb(size)}) in {time.perf_counter() - start:.1f}s")
            self.paths[geometry] = directory
        return self.paths[geometry]


def load_ours(path: Path, dtype: torch.dtype, device: torch.device, **kwargs: Any):
    from tp_siglip import SiglipVisionTransformer

    return SiglipVisionTransformer.from_pretrained(str(path), dtype=dtype, device=device, **kwargs)


def load_theirs(path: Path, dtype: torch.dtype, device: torch.device):
    from transformers import SiglipVisionModel

    quiet_transformers()
    model = SiglipVisionModel.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


# ============================================================================ measurement primitives


def matmul_ceiling(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seconds: float = 0.6) -> dict:
    """GFLOP/s of a plain ``F.linear((m, k), (n, k))`` (no bias): median of >= 3 timed calls."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
    with torch.inference_mode():
        first, _ = timed(lambda: F.linear(a, w), device)  # warm-up
        reps = max(3, min(50, int(seconds / max(first, 1e-6))))
        times = [timed(lambda: F.linear(a, w), device)[0] for _ in range(reps)]
    flops = 2.0 * m * k * n
    mid = median(times)
    return {"gflops": flops / mid / 1e9, "best_gflops": flops / min(times) / 1e9, "shape": [m, k, n],
            "reps": reps, "seconds": mid}


def best_ceiling(*measured: dict) -> dict:
    """The higher of ceilings measured around a cell (a busy moment only lowers a ceiling)."""
    best = max(measured, key=lambda c: c["gflops"])
    return {**best, "all_gflops": [c["gflops"] for c in measured]}


def outputs_of(out: Any) -> dict[str, torch.Tensor]:
    found = {"last_hidden_state": out.last_hidden_state}
    if getattr(out, "pooler_output", None) is not None:
        found["pooler_output"] = out.pooler_output
    return {k: v.detach().float().cpu() for k, v in found.items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if k in b)


def scale_of(a: dict[str, torch.Tensor]) -> float:
    return max(float(v.abs().max()) for v in a.values())


def parity(ours: dict, theirs: dict, dtype_name: str, fp32_ref: Optional[dict]) -> dict:
    """Max abs difference ours vs transformers, and whether it is sane.

    fp32: within 1e-4 of the outputs' largest magnitude. bf16: both are compared with transformers' fp32
    outputs on the same input when available, and ours may be off by at most 1.5x transformers' own
    bf16 error (+1e-3 of the scale); without an fp32 reference, within 5e-2 of the scale.
    """
    diff, scale = max_abs_diff(ours, theirs), scale_of(theirs)
    result: dict[str, Any] = {"max_abs_diff": diff, "scale": scale}
    if dtype_name == "fp32":
        result["ok"] = diff <= 1e-4 * max(scale, 1.0)
        result["text"] = f"{diff:.1e}"
    elif fp32_ref is not None:
        err_ours, err_theirs = max_abs_diff(ours, fp32_ref), max_abs_diff(theirs, fp32_ref)
        result.update(ours_vs_fp32=err_ours, theirs_vs_fp32=err_theirs)
        result["ok"] = err_ours <= 1.5 * err_theirs + 1e-3 * scale
        result["text"] = f"{diff:.1e} (vs fp32: ours {err_ours:.1e}, tf {err_theirs:.1e})"
    else:
        result["ok"] = diff <= 5e-2 * max(scale, 1.0)
        result["text"] = f"{diff:.1e}"
    result["text"] += "" if result["ok"] else " TOO LARGE"
    return result


# ============================================================================ the table


@dataclass
class Row:
    section: str
    geometry: str
    dtype: str
    batch: str
    setup: str
    ours: str
    reference: str
    ratio: str
    gflops: str = ""
    max_diff: str = ""
    target: str = ""
    met: str = ""
    data: dict[str, Any] = field(default_factory=dict)


COLUMNS = [
    ("section", "section"),
    ("geometry", "geometry"),
    ("dtype", "dtype"),
    ("batch", "batch"),
    ("setup", "measure / set-up"),
    ("ours", "ours"),
    ("reference", "reference"),
    ("ratio", "ours / ref"),
    ("gflops", "GFLOP/s ours / ref (of mm ceiling)"),
    ("max_diff", "max abs diff"),
    ("target", "target"),
    ("met", "met?"),
]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [str(getattr(row, key)).replace("|", "/") or "" for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(ok: Optional[bool]) -> str:
    return "" if ok is None else ("yes" if ok else "NO")


def at_least(value: float, bound: float) -> tuple[str, str]:
    return f">= {bound:.2f}x", verdict(value >= bound)


def at_most(value: float, bound: float) -> tuple[str, str]:
    return f"<= {bound:.2f}x", verdict(value <= bound)


def gflops_text(ours: float, ref: Optional[float], ceiling: float) -> str:
    text = f"{ours:.0f} ({ours / ceiling:.0%})"
    if ref is not None:
        text += f" / {ref:.0f} ({ref / ceiling:.0%})"
    return text + f" of {ceiling:.0f}"


# ============================================================================ options and plan


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
    compile: bool = False

    def iterations(self, seconds_per_round: float) -> int:
        """How many timed rounds a cell gets, from the cost of one round (all set-ups once)."""
        if self.fixed_iters is not None:
            return self.fixed_iters
        fit = int(self.cell_seconds // max(seconds_per_round, 1e-9))
        return max(self.min_iters, min(self.max_iters, fit))

    def throughput_cells(self) -> list[tuple[Geometry, str, int]]:
        cells = []
        for geometry in self.geometries:
            for dtype_name in self.dtypes:
                for batch in self.batches:
                    if (
                        self.device.type == "cpu"
                        and geometry.name == "so400m-384"
                        and batch >= 32
                        and not self.so400m_b32
                    ):
                        continue
                    cells.append((geometry, dtype_name, batch))
        return cells


def parse_options(argv: Optional[list[str]] = None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="tp-siglip vs transformers SiglipVisionModel: throughput, TP scaling, load memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1-2 layers, batch 1/2, 1 iteration (< 2 min)")
    parser.add_argument("--only", default=None, help="comma list of sections: throughput,scaling,memory")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the table (and raw data) here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's default)")
    parser.add_argument("--so400m-b32", action="store_true", help="include so400m-384 batch-32 cells on the CPU (slow)")
    parser.add_argument("--geometries", default=None, help="comma list among base-224,so400m-384")
    parser.add_argument("--dtypes", default=None, help="comma list among fp32,bf16")
    parser.add_argument("--batches", default=None, help="comma list of batch sizes")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers of every geometry")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up forwards per cell and model (>= 1)")
    parser.add_argument("--iters", type=int, default=None, help="fixed number of timed rounds per cell")
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument("--max-iters", type=int, default=10)
    parser.add_argument("--cell-seconds", type=float, default=12.0, help="timing budget per cell before --min-iters")
    parser.add_argument("--long-forward", type=float, default=10.0,
                        help="no warm-up at a larger batch once one forward takes longer than this (s)")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the temporary checkpoints go")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the extra 'ours + torch.compile' throughput rows")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    threads = args.threads or torch.get_num_threads()
    sections = tuple(SECTIONS if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()])
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")

    cuda = device.type == "cuda"
    quick_layers = {"base-224": 2, "so400m-384": 1}
    if args.geometries:
        names = [g.strip() for g in args.geometries.split(",")]
        bad = [n for n in names if n not in GEOMETRIES]
        if bad:
            parser.error(f"--geometries: unknown {bad}; choose from {list(GEOMETRIES)}")
        geometries = [GEOMETRIES[n] for n in names]
    else:
        geometries = [SO400M_384] if cuda else [BASE_224, SO400M_384]
    if args.quick:
        geometries = [replace(g, layers=quick_layers[g.name]) for g in geometries]
    if args.layers:
        geometries = [replace(g, layers=args.layers) for g in geometries]
    dtypes = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else (["bf16"] if cuda else ["fp32", "bf16"])
    if any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes: choose from {list(DTYPES)}")
    if args.batches:
        batches = sorted({int(b) for b in args.batches.split(",")})
    else:
        batches = [1, 2] if args.quick else ([64] if cuda else [1, 8, 32])

    scaling_geometry = replace(SO400M_384 if cuda else BASE_224)
    memory_geometry = SO400M_384
    if args.quick:
        scaling_geometry = replace(scaling_geometry, layers=2)
        memory_geometry = replace(memory_geometry, layers=2)
    if args.layers:
        scaling_geometry = replace(scaling_geometry, layers=args.layers)
        memory_geometry = replace(memory_geometry, layers=args.layers)

    warmup = args.warmup if args.warmup is not None else (3 if cuda and not args.quick else 1)
    options = Options(
        device=device,
        threads=threads,
        quick=args.quick,
        sections=sections,
        geometries=geometries,
        dtypes=dtypes,
        batches=batches,
        so400m_b32=args.so400m_b32,
        warmup=max(1, warmup),
        min_iters=1 if args.quick else args.min_iters,
        max_iters=1 if args.quick else max(args.min_iters, args.max_iters),
        fixed_iters=1 if args.quick and args.iters is None else args.iters,
        cell_seconds=args.cell_seconds,
        long_forward=args.long_forward,
        scaling_geometry=scaling_geometry,
        scaling_batch=2 if args.quick else (64 if cuda else 8),
        scaling_ranks=2,
        memory_geometry=memory_geometry,
        compile=not args.no_compile,
    )
    return options, args


def estimate_seconds(opts: Options) -> float:
    """A rough wall-clock estimate of the whole run on this CPU, from two short matmul probes.

    Assumes the models reach ~75 % (fp32) / ~60 % (bf16) of the probe and adds fixed costs for writing
    checkpoints, loading and spawning. Only meant to say "minutes, not hours"."""
    probe = {name: matmul_ceiling(1568, 768, 3072, DTYPES[name], opts.device, seconds=0.3)["best_gflops"] for name in DTYPES}
    speed = {"fp32": 0.75 * probe["fp32"], "bf16": 0.6 * probe["bf16"]}
    total = 0.0
    written: set[Geometry] = set()

    def write_cost(g: Geometry) -> float:
        if g in written:
            return 0.0
        written.add(g)
        return 3.0 + g.param_count() * 4 / 60e6  # fill + save at ~60 MB/s on two cores

    if "throughput" in opts.sections:
        for geometry in opts.geometries:
            total += write_cost(geometry)
        previous: dict[tuple[Geometry, str], tuple[int, float]] = {}
        for geometry, dtype_name, batch in opts.throughput_cells():
            pair = 2 * batch * geometry.flops_per_image() / (speed[dtype_name] * 1e9)
            warmup = warmup_rounds(opts, batch, previous.get((geometry, dtype_name)))
            total += pair * (warmup + opts.iterations(pair)) + 2.0
            previous[(geometry, dtype_name)] = (batch, pair)
        total += sum(4.0 + 2 * g.param_count() * 4 / 0.8e9 for g in opts.geometries) * len(opts.dtypes)
    if "scaling" in opts.sections:
        g = opts.scaling_geometry
        total += write_cost(g) + 15.0
        for dtype_name in ("fp32", "bf16"):
            forward = opts.scaling_batch * g.flops_per_image() / (speed[dtype_name] * 1e9)
            total += 3 * forward * (opts.warmup + opts.iterations(3 * forward)) + 5.0
    if "memory" in opts.sections:
        g = opts.memory_geometry
        total += write_cost(g) + 3 * 8.0 + 3 * g.param_count() * 4 / 0.8e9
    return total


# ============================================================================ section: throughput


def run_throughput(opts: Options, checkpoints: Checkpoints, rows: list[Row]) -> None:
    device = opts.device
    fp32_refs: dict[tuple[Geometry, int], dict] = {}
    cells = opts.throughput_cells()
    for geometry in opts.geometries:
        path = checkpoints.get(geometry)
        for dtype_name in opts.dtypes:
            batches = [b for g, d, b in cells if g == geometry and d == dtype_name]
            if not batches:
                continue
            dtype = DTYPES[dtype_name]
            start = time.perf_counter()
            ours = load_ours(path, dtype, device)
            ours_load = time.perf_counter() - start
            start = time.perf_counter()
            theirs = load_theirs(path, dtype, device)
            theirs_load = time.perf_counter() - start
            compiled = torch.compile(load_ours(path, dtype, device)) if opts.compile else None
            attn = getattr(theirs.config, "_attn_implementation", "?")
            log(f"{geometry.label} {dtype_name}: loaded ours in {ours_load:.1f}s, transformers ({attn}) in {theirs_load:.1f}s")
            previous: Optional[tuple[int, float]] = None  # (batch, seconds of one ours+theirs pair)
            for batch in batches:
                row, compiled_row = throughput_cell(
                    opts, ours, theirs, attn, geometry, dtype_name, batch, fp32_refs, previous, compiled
                )
                rows.append(row)
                if compiled_row is not None:
                    rows.append(compiled_row)
                previous = (batch, row.data["ours_seconds_median"] + row.data["theirs_seconds_median"])
            del ours, theirs, compiled
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def warmup_rounds(opts: Options, batch: int, previous: Optional[tuple[int, float]]) -> int:
    """Warm-up forwards for a cell: ``opts.warmup``, or none when a smaller batch of the same models has
    already run and one forward here is predicted to take over ``opts.long_forward`` seconds (there the
    first-call costs are lost in the noise, and a warm-up would cost a whole extra round)."""
    if previous is None:
        return opts.warmup
    prev_batch, prev_pair = previous
    return 0 if prev_pair * batch / prev_batch / 2 > opts.long_forward else opts.warmup


def throughput_cell(opts, ours, theirs, attn, geometry, dtype_name, batch, fp32_refs, previous, compiled=None):
    """One (geometry, dtype, batch) cell: warm-up, then interleaved timed pairs (triples with the
    ``torch.compile``-d copy of ours); outputs of the first forward of each model are compared. Returns
    the eager row and the compiled row (or None)."""
    device, dtype = opts.device, DTYPES[dtype_name]
    x = pixels(batch, geometry.image, seed=1000 + batch, device=device)
    gemm = (batch * geometry.tokens, geometry.hidden, geometry.intermediate)
    ceiling = matmul_ceiling(*gemm, dtype, device)
    run_ours = lambda: ours(x)  # noqa: E731
    run_theirs = lambda: theirs(pixel_values=x)  # noqa: E731
    warmup = warmup_rounds(opts, batch, previous)
    mine = ref = fast = None
    t_compiled: list[float] = []
    with torch.inference_mode():
        if compiled is not None:  # compile (or recompile for this batch) outside the timed rounds
            start = time.perf_counter()
            fast = outputs_of(compiled(x))
            compiled(x)
            log(f"{geometry.label} {dtype_name} b{batch}: torch.compile warm-up {time.perf_counter() - start:.0f}s")
        warm: list[tuple[float, float]] = []
        for _ in range(warmup):
            t_o, out = timed(run_ours, device)
            mine = mine or outputs_of(out)
            del out
            t_t, out = timed(run_theirs, device)
            ref = ref or outputs_of(out)
            del out
            warm.append((t_o, t_t))
        if warm:
            rounds = opts.iterations(sum(warm[-1]))
        else:
            rounds = opts.iterations(previous[1] * batch / previous[0])
        t_ours, t_theirs = [], []
        for _ in range(rounds):
            t_o, out = timed(run_ours, device)
            mine = mine or outputs_of(out)
            del out
            t_t, out = timed(run_theirs, device)
            ref = ref or outputs_of(out)
            del out
            t_ours.append(t_o)
            t_theirs.append(t_t)
            if compiled is not None:
                t_c, out = timed(lambda: compiled(x), device)
                del out
                t_compiled.append(t_c)
    if dtype_name == "fp32":
        fp32_refs[(geometry, batch)] = ref
    check = parity(mine, ref, dtype_name, fp32_refs.get((geometry, batch)))
    compiled_check = parity(fast, ref, dtype_name, fp32_refs.get((geometry, batch))) if fast is not None else None
    del mine, ref, fast
    ceiling = best_ceiling(ceiling, matmul_ceiling(*gemm, dtype, device))
    ips_ours, ips_theirs = batch / median(t_ours), batch / median(t_theirs)
    flops = geometry.flops_per_image()
    g_ours, g_theirs = ips_ours * flops / 1e9, ips_theirs * flops / 1e9
    speedup = ips_ours / ips_theirs
    threads = f"{opts.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    log(
        f"{geometry.label} {dtype_name} b{batch}: ours {ips_ours:.2f} img/s, transformers {ips_theirs:.2f} img/s "
        f"({speedup:.2f}x), {warmup}+{rounds} rounds, mm ceiling {ceiling['gflops']:.0f} GFLOP/s, diff {check['text']}"
    )

    def row(setup: str, ips: float, diff: str, data: dict) -> Row:
        ratio = ips / ips_theirs
        target, met = at_least(ratio, 1.05 if dtype_name == "fp32" else 1.2) if device.type == "cpu" else ("", "")
        return Row(
            section="throughput",
            geometry=geometry.label,
            dtype=dtype_name,
            batch=str(batch),
            setup=setup,
            ours=f"{ips:.2f}",
            reference=f"{ips_theirs:.2f}",
            ratio=f"{ratio:.2f}x",
            gflops=gflops_text(ips * flops / 1e9, g_theirs, ceiling["gflops"]),
            max_diff=diff,
            target=target,
            met=met,
            data=data,
        )

    compiled_row = None
    if t_compiled:
        ips_c = batch / median(t_compiled)
        log(f"{geometry.label} {dtype_name} b{batch}: ours + torch.compile {ips_c:.2f} img/s ({ips_c / ips_theirs:.2f}x)")
        compiled_row = row(
            f"img/s, ours + torch.compile, 1 rank x {threads} vs transformers ({attn}, eager)",
            ips_c,
            compiled_check["text"],
            {"compiled_seconds": t_compiled, "compiled_img_s": ips_c, "speedup": ips_c / ips_theirs},
        )
    eager_row = row(
        f"img/s, 1 rank x {threads} vs transformers ({attn})",
        ips_ours,
        check["text"],
        {
            "ours_seconds": t_ours,
            "theirs_seconds": t_theirs,
            "warmup_seconds": warm,
            "ours_seconds_median": median(t_ours),
            "theirs_seconds_median": median(t_theirs),
            "ours_img_s": ips_ours,
            "theirs_img_s": ips_theirs,
            "speedup": speedup,
            "flops_per_image": flops,
            "ours_gflops": g_ours,
            "theirs_gflops": g_theirs,
            "ceiling": ceiling,
            "parity": {k: v for k, v in check.items() if k != "text"},
            "attn_implementation": attn,
            "threads": opts.threads,
        },
    )
    return eager_row, compiled_row


# ============================================================================ spawned ranks


def _rank_main(rank: int, world: int, threads: int, store: str, device_kind: str, inbox: Any, outbox: Any) -> None:
    """A spawned rank: join the group, then serve commands from ``inbox`` until ``None``."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    if world > 1:
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=900)
        )
    state: dict[str, Any] = {"rank": rank, "world": world, "device": device}
    try:
        while True:
            message = inbox.get()
            if message is None:
                break
            name, args = message
            try:
                outbox.put((rank, WORKER_COMMANDS[name](state, *args), None))
            except BaseException:  # noqa: BLE001 - reported to the parent, which raises
                outbox.put((rank, None, traceback.format_exc()))
    finally:
        state.clear()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _barrier(state: dict) -> None:
    if state["world"] > 1:
        if state["device"].type == "cuda":
            dist.barrier(device_ids=[state["device"].index])
        else:
            dist.barrier()


def _cmd_load(state: dict, path: str, dtype_name: str, parallel: str) -> float:
    state.pop("model", None)
    gc.collect()
    start = time.perf_counter()
    state["model"] = load_ours(Path(path), DTYPES[dtype_name], state["device"], world_size=state["world"], parallel=parallel)
    return time.perf_counter() - start


def _cmd_forward(state: dict, image: int, batch: int, rounds: int, keep_outputs: bool) -> dict:
    """``rounds`` forwards of the same batch, each between two barriers; rank 0 reports the times."""
    model, device = state["model"], state["device"]
    x = pixels(batch, image, seed=2000 + batch, device=device)
    times, kept = [], None
    with torch.inference_mode():
        for _ in range(rounds):
            _barrier(state)
            sync(device)
            start = time.perf_counter()
            out = model(x)
            sync(device)
            _barrier(state)
            times.append(time.perf_counter() - start)
            if keep_outputs and kept is None and state["rank"] == 0:
                kept = {k: v.numpy() for k, v in outputs_of(out).items()}
            del out
    return {"times": times, "outputs": kept}


def _cmd_measure_load(state: dict, kind: str, path: str, primer: str) -> dict:
    """Load time, parameter bytes and peak RSS growth of one from_pretrained, in a fresh process."""
    device, world = state["device"], state["world"]

    def load(where: str):
        if kind == "transformers":
            return load_theirs(Path(where), torch.float32, device)
        return load_ours(Path(where), torch.float32, device, world_size=world)

    primed = load(primer)  # lazy imports and first-call set-up are not what we measure
    del primed
    gc.collect()
    _barrier(state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    reset = reset_peak_rss()
    before = proc_status()
    gpu_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    model = load(path)
    sync(device)
    seconds = time.perf_counter() - start
    after = proc_status()
    # transformers keeps same-dtype safetensors weights memory-mapped: they become resident only when
    # read. One pass over every parameter shows what the model occupies once it has been used.
    start = time.perf_counter()
    with torch.inference_mode():
        for param in model.parameters():
            param.sum()
    sync(device)
    touch_seconds = time.perf_counter() - start
    touched = proc_status()
    result = {
        "load_seconds": seconds,
        "touch_seconds": touch_seconds,
        "param_bytes": param_bytes(model),
        "rss_before": before["VmRSS"],
        "hwm_before": before["VmHWM"],
        "hwm_after": after["VmHWM"],
        "rss_after": after["VmRSS"],
        "anon_growth": after["RssAnon"] - before["RssAnon"],
        "file_growth": after["RssFile"] - before["RssFile"],
        "peak_growth": after["VmHWM"] - before["VmRSS"],
        "peak_growth_touched": touched["VmHWM"] - before["VmRSS"],
        "hwm_reset": reset,
    }
    if device.type == "cuda":
        result["gpu_peak_growth"] = torch.cuda.max_memory_allocated(device) - gpu_before
    _barrier(state)
    return result


WORKER_COMMANDS: dict[str, Callable[..., Any]] = {
    "load": _cmd_load,
    "forward": _cmd_forward,
    "measure_load": _cmd_measure_load,
}


class RankGroup:
    """``world`` spawned processes with ``threads`` intra-op threads each, serving commands together."""

    _ids = itertools.count()

    def __init__(self, world: int, threads: int, workdir: Path, device: torch.device) -> None:
        ctx = mp.get_context("spawn")
        store = workdir / f"store-{os.getpid()}-{next(self._ids)}"
        self.world = world
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the children only
        try:
            self.procs = [
                ctx.Process(
                    target=_rank_main,
                    args=(rank, world, threads, str(store), device.type, self.inboxes[rank], self.outbox),
                    daemon=True,
                )
                for rank in range(world)
            ]
            for proc in self.procs:
                proc.start()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved

    def call(self, command: str, *args: Any, timeout: float = 1800.0) -> list[Any]:
        for inbox in self.inboxes:
            inbox.put((command, args))
        results: list[Any] = [None] * self.world
        errors = []
        for _ in range(self.world):
            rank, value, error = self.outbox.get(timeout=timeout)
            results[rank] = value
            if error:
                errors.append(f"rank {rank} of {self.world}:\n{error}")
        if errors:
            raise RuntimeError(f"{command} failed:\n" + "\n".join(errors))
        return results

    def close(self) -> None:
        for inbox in self.inboxes:
            try:
                inbox.put(None)
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)

    def __enter__(self) -> "RankGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ============================================================================ section: scaling


def run_scaling(opts: Options, checkpoints: Checkpoints, workdir: Path, rows: list[Row]) -> None:
    geometry, batch, ranks = opts.scaling_geometry, opts.scaling_batch, opts.scaling_ranks
    device = opts.device
    if device.type == "cuda":
        if torch.cuda.device_count() < ranks:
            rows.append(
                Row("scaling", geometry.label, "bf16", str(batch), f"1 GPU vs {ranks} GPUs (NCCL)",
                    "skipped", "", "", max_diff=f"only {torch.cuda.device_count()} GPU(s)")
            )
            log("scaling: skipped (fewer than 2 GPUs)")
            return
        setups = [("1 GPU", 1, 1, "tensor"), (f"{ranks} GPUs, tensor", ranks, 1, "tensor"),
                  (f"{ranks} GPUs, data", ranks, 1, "data")]
        dtypes = ["bf16"]
    else:
        total = opts.threads
        per_rank = max(1, total // ranks)
        setups = [
            (f"1 rank x {total} threads", 1, total, "tensor"),
            (f"{ranks} ranks x {per_rank} thread{'s' * (per_rank > 1)}, tensor", ranks, per_rank, "tensor"),
            (f"{ranks} ranks x {per_rank} thread{'s' * (per_rank > 1)}, data", ranks, per_rank, "data"),
        ]
        dtypes = ["fp32", "bf16"]
    path = checkpoints.get(geometry)
    flops = geometry.flops_per_image()
    groups: list[RankGroup] = []
    try:
        start = time.perf_counter()
        for _, world, threads, _ in setups:
            groups.append(RankGroup(world, threads, workdir, device))
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            loads = [max(group.call("load", str(path), dtype_name, parallel)) for group, (_, _, _, parallel) in zip(groups, setups)]
            log(f"scaling {dtype_name}: ranks up and loaded in {time.perf_counter() - start:.1f}s "
                f"(load {', '.join(f'{s:.1f}s' for s in loads)})")
            gemm = (batch * geometry.tokens, geometry.hidden, geometry.intermediate)
            ceiling = matmul_ceiling(*gemm, dtype, device)  # the ranks are idle now
            warm = [group.call("forward", geometry.image, batch, opts.warmup, True)[0] for group in groups]
            per_round = sum(w["times"][-1] for w in warm)
            rounds = opts.iterations(per_round)
            times: list[list[float]] = [[] for _ in groups]
            for _ in range(rounds):  # round-robin: 1 rank, tensor, data, 1 rank, ...
                for i, group in enumerate(groups):
                    times[i].extend(group.call("forward", geometry.image, batch, 1, False)[0]["times"])
            ceiling = best_ceiling(ceiling, matmul_ceiling(*gemm, dtype, device))
            base_outputs = {k: torch.from_numpy(v) for k, v in warm[0]["outputs"].items()}
            base_ips = batch / median(times[0])
            for i, (label, world, _, parallel) in enumerate(setups):
                ips = batch / median(times[i])
                ratio = ips / base_ips
                outputs = {k: torch.from_numpy(v) for k, v in warm[i]["outputs"].items()}
                diff = max_abs_diff(outputs, base_outputs)
                target, met = ("", "") if world == 1 else at_least(ratio, 0.9)
                rows.append(
                    Row(
                        section="scaling",
                        geometry=geometry.label,
                        dtype=dtype_name,
                        batch=str(batch),
                        setup=f"img/s, {label}" + (" (baseline)" if i == 0 else f" vs {setups[0][0]}"),
                        ours=f"{ips:.2f}",
                        reference=f"{base_ips:.2f}",
                        ratio=f"{ratio:.2f}x",
                        gflops=gflops_text(ips * flops / 1e9, None, ceiling["gflops"]),
                        max_diff="(baseline)" if i == 0 else f"{diff:.1e} vs 1 rank",
                        target=target,
                        met=met,
                        data={"seconds": times[i], "img_s": ips, "ratio": ratio, "world": world,
                              "parallel": parallel, "load_seconds": loads[i], "max_abs_diff_vs_1_rank": diff,
                              "ceiling": ceiling},
                    )
                )
                log(f"scaling {dtype_name} {label}: {ips:.2f} img/s ({ratio:.2f}x), {rounds} rounds, diff {diff:.1e}")
    finally:
        for group in groups:
            group.close()


# ============================================================================ section: memory


def run_memory(opts: Options, checkpoints: Checkpoints, workdir: Path, rows: list[Row]) -> None:
    geometry, device = opts.memory_geometry, opts.device
    path = checkpoints.get(geometry)
    primer = checkpoints.get(PRIMER)
    ranks = 2
    two_ranks_possible = device.type == "cpu" or torch.cuda.device_count() >= ranks
    measured: dict[str, list[dict]] = {}
    plan = [("ours-1", "ours", 1, opts.threads), ("transformers-1", "transformers", 1, opts.threads)]
    if two_ranks_possible:
        plan.insert(1, ("ours-2", "ours", ranks, max(1, opts.threads // ranks)))
    for key, kind, world, threads in plan:
        with RankGroup(world, threads, workdir, device) as group:
            measured[key] = group.call("measure_load", kind, str(path), str(primer))
        per_rank = ", ".join(
            f"rank {r}: {m['load_seconds']:.1f}s, params {gb(m['param_bytes'])}, peak +{gb(m['peak_growth'])}"
            for r, m in enumerate(measured[key])
        )
        log(f"memory {key}: {per_rank}")

    one, tf = measured["ours-1"][0], measured["transformers-1"][0]
    method = "VmHWM reset via clear_refs" if all(m["hwm_reset"] for ms in measured.values() for m in ms) else "VmHWM - VmRSS before"
    common = dict(section="memory", geometry=geometry.label, dtype="fp32", batch="-")

    def add(setup: str, ours: str, ref: str, ratio: float, note: str = "", bound: Optional[float] = None, data=None) -> None:
        target, met = at_most(ratio, bound) if bound is not None else ("", "")
        rows.append(Row(**common, setup=setup, ours=ours, reference=ref, ratio=f"{ratio:.2f}x",
                        max_diff=note, target=target, met=met, data=data or {}))

    gpu = device.type == "cuda"
    add("load time, ours 1 rank vs transformers", f"{one['load_seconds']:.2f} s", f"{tf['load_seconds']:.2f} s",
        one["load_seconds"] / tf["load_seconds"], data={"ours": one, "transformers": tf})
    add("params held, ours 1 rank vs transformers", gb(one["param_bytes"]), gb(tf["param_bytes"]),
        one["param_bytes"] / tf["param_bytes"])
    lazy = tf["anon_growth"] < tf["param_bytes"] // 2 and not gpu  # parameters not in anonymous memory
    lazy_note = "; transformers' weights stay mmap-ed, read at first use" if lazy else ""
    add("peak RSS growth while loading, ours 1 rank vs transformers", gb(one["peak_growth"]), gb(tf["peak_growth"]),
        one["peak_growth"] / max(tf["peak_growth"], 1), note=method + lazy_note)
    add("load + one read of every parameter, ours 1 rank vs transformers",
        f"{one['load_seconds'] + one['touch_seconds']:.2f} s",
        f"{tf['load_seconds'] + tf['touch_seconds']:.2f} s",
        (one["load_seconds"] + one["touch_seconds"]) / (tf["load_seconds"] + tf["touch_seconds"]))
    add("peak RSS growth after load + one read of every parameter, ours 1 rank vs transformers",
        gb(one["peak_growth_touched"]), gb(tf["peak_growth_touched"]),
        one["peak_growth_touched"] / max(tf["peak_growth_touched"], 1),
        note=f"RSS growth anon/file after load: ours {gb(one['anon_growth'])}/{gb(one['file_growth'])}, "
        f"tf {gb(tf['anon_growth'])}/{gb(tf['file_growth'])}")
    if gpu:
        add("GPU peak growth while loading, ours 1 rank vs transformers", gb(one["gpu_peak_growth"]),
            gb(tf["gpu_peak_growth"]), one["gpu_peak_growth"] / max(tf["gpu_peak_growth"], 1))
    if "ours-2" in measured:
        two = measured["ours-2"]
        label = f"{ranks} ranks (rank " + " / ".join(str(r) for r in range(ranks)) + ") vs 1 rank"
        param_ratios = [m["param_bytes"] / one["param_bytes"] for m in two]
        growth_ratios = [m["peak_growth"] / max(one["peak_growth"], 1) for m in two]
        time_ratios = [m["load_seconds"] / one["load_seconds"] for m in two]
        slash = lambda values, fmt: " / ".join(fmt(v) for v in values)  # noqa: E731
        add(f"params held per rank, {label}", slash([m["param_bytes"] for m in two], gb), gb(one["param_bytes"]),
            max(param_ratios), note="ratio: largest rank", bound=0.55, data={"ranks": two, "ratios": param_ratios})
        add(f"peak RSS growth while loading per rank, {label}", slash([m["peak_growth"] for m in two], gb),
            gb(one["peak_growth"]), max(growth_ratios), note=f"largest rank; {method}", bound=0.6,
            data={"ratios": growth_ratios})
        add(f"load time per rank, {label}", slash([m["load_seconds"] for m in two], lambda s: f"{s:.2f} s"),
            f"{one['load_seconds']:.2f} s", max(time_ratios), note="slowest rank", data={"ratios": time_ratios})
    else:
        add(f"{ranks} ranks", "skipped", "", float("nan"), note=f"needs {ranks} GPUs")


# ============================================================================ machine and main


def machine_info(opts: Options) -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    info["cpu"] = names[0].strip() if names else platform.processor() or platform.machine()
    flags_line = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    cores = set(re.findall(r"^physical id\s*:\s*(\d+)\s*$.*?^core id\s*:\s*(\d+)\s*$", cpuinfo, re.M | re.S))
    info["physical_cores"] = len(cores) or None
    info["logical_cpus"] = os.cpu_count()
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cpus"] = os.cpu_count()
    try:
        mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        info["memory_gb"] = round(int(mem.group(1)) / 1024**2, 1) if mem else None
    except OSError:
        info["memory_gb"] = None
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    info["python"] = platform.python_version()
    info["torch"] = torch.__version__
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    import tp_siglip

    info["tp_siglip"] = getattr(tp_siglip, "__version__", "?")
    info["threads"] = opts.threads
    info["device"] = str(opts.device)
    if opts.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def header(info: dict[str, Any], opts: Options) -> str:
    lines = [
        "# tp-siglip benchmark",
        "",
        f"- CPU: {info['cpu']} ({info['physical_cores'] or '?'} cores, {info['logical_cpus']} logical, "
        f"{info['usable_cpus']} usable; {', '.join(info['isa']) or 'no AVX flags'}), {info['memory_gb']} GB RAM, "
        f"load average {info['load_average'][0]} at start",
        f"- torch {info['torch']}, transformers {info['transformers']}, tp-siglip {info['tp_siglip']}, "
        f"Python {info['python']}; intra-op threads {info['threads']}; device {info['device']}",
    ]
    if "gpu" in info:
        lines.append(f"- GPU: {info['gpu']} x {info['gpus']}, CUDA {info['cuda']}")
    lines.append(f"- sections: {', '.join(opts.sections)}" + ("; QUICK smoke run: timings are not meaningful" if opts.quick else ""))
    return "\n".join(lines)


NOTES = [
    "throughput: medians of interleaved forwards (ours, transformers, ...) after warm-up, torch.inference_mode(), "
    "same checkpoint; transformers uses attn_implementation as shown in the set-up column.",
    "GFLOP/s: analytic model FLOPs (2*T*(4D^2+2DF) + 4*T^2*D per layer, + patch conv + head) x img/s; "
    "'of N' is the F.linear ceiling (B*T, D) @ (D, F) at the same dtype and threads, timed just before and just "
    "after the cell (the higher kept).",
    "max abs diff: over last_hidden_state and pooler_output; bf16 also against transformers' fp32 outputs.",
    "scaling: spawned ranks (gloo, file:// store); barrier before/after each forward, timed on rank 0, round-robin over set-ups.",
    "memory: fresh process per rank; peak RSS growth = VmHWM after from_pretrained - VmRSS just before; the "
    "'one read of every parameter' rows add a sum over each parameter (transformers mmaps same-dtype weights).",
]


def main(argv: Optional[list[str]] = None) -> int:
    opts, args = parse_options(argv)
    torch.set_num_threads(opts.threads)
    info = machine_info(opts)
    print(header(info, opts), flush=True)
    if opts.device.type == "cpu":
        estimate = estimate_seconds(opts)
        log(f"estimated run time: ~{estimate / 60:.1f} min on this machine if it is otherwise idle")
    else:
        estimate = None
    root = Path(tempfile.mkdtemp(prefix="tp-siglip-bench-", dir=args.tmpdir))
    checkpoints = Checkpoints(root)
    rows: list[Row] = []
    failures: list[str] = []
    try:
        for section in SECTIONS:
            if section not in opts.sections:
                continue
            try:
                if section == "throughput":
                    run_throughput(opts, checkpoints, rows)
                elif section == "scaling":
                    run_scaling(opts, checkpoints, root, rows)
                else:
                    run_memory(opts, checkpoints, root, rows)
            except Exception:  # noqa: BLE001 - report, go on with the next section
                failures.append(f"{section}: {traceback.format_exc()}")
                log(f"{section} FAILED:\n{failures[-1]}")
                rows.append(Row(section, "", "", "", "FAILED (see stderr)", "", "", ""))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.perf_counter() - START
    print()
    print(markdown(rows))
    print()
    for note in NOTES:
        print(f"- {note}")
    print(f"- total wall time {elapsed / 60:.1f} min" + (f" (estimated {estimate / 60:.1f} min)" if estimate else ""))
    if args.json:
        payload = {
            "machine": info,
            "options": {k: (str(v) if isinstance(v, (torch.device, Path)) else v) for k, v in vars(args).items()},
            "rows": [asdict(r) for r in rows],
            "notes": NOTES,
            "wall_seconds": elapsed,
            "estimated_seconds": estimate,
            "failures": failures,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        log(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
