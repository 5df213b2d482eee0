"""Section ``fused``: one fused q/k/v GEMM per attention (today's model) vs the three GEMMs it replaced.

Since the fusion each `SiglipAttention` computes this rank's q, k and v heads with one column-parallel
GEMM (``qkv_proj``, weight ``(3 * local, D)``) and splits the result with one view/permute. The
"three GEMMs" variant is rebuilt here on the same weights: `ThreeGemmAttention` holds three separately
allocated, contiguous weight/bias tensors (clones of the q, k and v row blocks of ``qkv_proj``) and runs
the forward of the model before the fusion: three ``F.linear``, each ``view(B, T, -1, head_dim)
.transpose(1, 2)``, then the same attention and the same (shared) ``out_proj``. The pooling head is
fused in both variants (its one-query attention is a negligible share of the work).

Both variants live in the same loaded model: `use_variant` swaps each layer's ``self_attn`` between
them before a forward, so nothing but the q/k/v projections differs. Set-ups: 1 rank with every thread,
and 2 ranks in tensor mode with N/2 threads each (on GPUs: 1 GPU, and 2 GPUs when there are two), each
a `RankGroup` of spawned ranks; every forward sits between barriers and is timed on rank 0. Per
(geometry, dtype): warm-up forwards of both variants (their outputs compared: max abs diff), then timed
forwards interleaved fused, three, fused, three, ... (at least `MIN_PAIRS` pairs) with medians
reported, so that a busy moment on a shared machine hits both alike; the ratio fused / three is the
result, shown with the median and range of the ratios of single pairs (each pair ran back to back,
so a change in the machine's load between pairs cancels out of it). A second row times the
q/k/v projections alone (one ``(B*T, D) x (D, 3*local)`` GEMM vs three ``(D, local)`` ones, bias
included, interleaved the same way) on each rank at once.

Defaults on the CPU: base-224 (12 layers) and so400m-384 cut to 4 layers (the q/k/v share of each layer
does not depend on depth), batch 8, fp32 and bf16. Run it alone with ``python benchmarks/fused_qkv.py``
(the same as ``python benchmarks/bench.py --only fused``; every bench.py option applies).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.checkpoints import Checkpoints, load_ours
from benchmarks.common import DTYPES, Geometry, log, max_abs_diff, median, scale_of
from benchmarks.options import FUSED_MIN_PAIRS as MIN_PAIRS
from benchmarks.options import Options
from benchmarks.ranks import RankGroup, barrier, forward_rounds
from benchmarks.table import Row, gflops_text

NOTES = ["fused: the same loaded model with each encoder attention's q/k/v as one fused GEMM (today) or as three "
         "GEMMs on cloned, separately allocated q/k/v weights (the code before the fusion); interleaved "
         "forwards fused, three, fused, ... (at least 5 pairs), medians, barriers around each forward, timed on "
         "rank 0; ratio = fused / three speed (above 1: fused is faster) from the two medians, in brackets the "
         "median and the range of the ratios of single pairs (steadier when the load drifts during a cell)."]
VARIANTS = ("fused", "three")


class ThreeGemmAttention(nn.Module):
    """The attention as it was before q/k/v were fused: three GEMMs on three separate weights.

    Built from a fused ``SiglipAttention``: its q, k and v row blocks are cloned into their own
    contiguous tensors; ``out_proj`` (and its all-reduce) is the fused module's own, shared.
    """

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        spans = fused.qkv_proj.block_rows()
        if len(spans) != 3:
            raise ValueError(f"expected a q/k/v layer of 3 blocks, got {len(spans)}")
        weight, bias = fused.qkv_proj.weight.detach(), fused.qkv_proj.bias.detach()
        for name, (start, end) in zip(("q", "k", "v"), spans):
            self.register_buffer(f"{name}_weight", weight[start:end].clone())
            self.register_buffer(f"{name}_bias", bias[start:end].clone())
        self.head_dim, self.scale = fused.head_dim, fused.scale
        self.attn_implementation = fused.attn_implementation
        self.out_proj = fused.out_proj

    def forward(self, hidden_states: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        from tp_siglip.model import attention

        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, -1, self.head_dim)
        query = F.linear(hidden_states, self.q_weight, self.q_bias).view(shape).transpose(1, 2)
        key = F.linear(hidden_states, self.k_weight, self.k_bias).view(shape).transpose(1, 2)
        value = F.linear(hidden_states, self.v_weight, self.v_bias).view(shape).transpose(1, 2)
        out = attention(query, key, value, scale=self.scale, implementation=self.attn_implementation, key_mask=key_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


def attention_variants(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Each encoder layer's attention, as loaded (``fused``) and rebuilt as three GEMMs (``three``)."""
    fused = [layer.self_attn for layer in model.encoder.layers]
    return {"fused": fused, "three": [ThreeGemmAttention(attn) for attn in fused]}


def use_variant(model: nn.Module, variants: dict[str, list[nn.Module]], name: str) -> None:
    for layer, attn in zip(model.encoder.layers, variants[name]):
        layer.self_attn = attn


def fused_load_command(state: dict, path: str, dtype_name: str) -> float:
    """Rank command: load the checkpoint (tensor mode, this group's world size), build both variants."""
    state.pop("model", None)
    state.pop("variants", None)
    gc.collect()
    start = time.perf_counter()
    model = load_ours(Path(path), DTYPES[dtype_name], state["device"], world_size=state["world"])
    state["model"], state["variants"] = model, attention_variants(model)
    return time.perf_counter() - start


def fused_forward_command(state: dict, variant: str, image: int, batch: int, rounds: int, keep_outputs: bool) -> dict:
    """Rank command: timed forwards of one variant (see `ranks.forward_rounds`)."""
    use_variant(state["model"], state["variants"], variant)
    return forward_rounds(state, state["model"], image, batch, rounds, keep_outputs)


def fused_gemm_command(state: dict, rows: int, rounds: int) -> dict:
    """Rank command: the first layer's q/k/v projections alone on a ``(rows, D)`` input, ``rounds``
    interleaved pairs (fused GEMM, three GEMMs), each call between barriers; this rank's times."""
    fused, three = (state["variants"][name][0] for name in VARIANTS)
    weight, bias = fused.qkv_proj.weight, fused.qkv_proj.bias
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(3)).to(weight)
    calls = {
        "fused": lambda: F.linear(x, weight, bias),
        "three": lambda: [F.linear(x, getattr(three, f"{n}_weight"), getattr(three, f"{n}_bias")) for n in "qkv"],
    }
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with torch.inference_mode():
        for _ in range(rounds):
            for name in VARIANTS:
                barrier(state)
                start = time.perf_counter()
                out = calls[name]()
                if state["device"].type == "cuda":
                    torch.cuda.synchronize(state["device"])
                times[name].append(time.perf_counter() - start)
                del out
    return {"times": times, "flops": 2.0 * rows * weight.shape[0] * weight.shape[1]}


def fused_setups(opts: Options) -> list[tuple[str, int, int]]:
    """(label, ranks, threads per rank): 1 rank with every thread, 2 tensor-parallel ranks on the same cores."""
    if opts.device.type == "cuda":
        return [("1 GPU", 1, 1)] + ([("2 GPUs, tensor", 2, 1)] if torch.cuda.device_count() >= 2 else [])
    per_rank = max(1, opts.threads // 2)
    return [(f"1 rank x {opts.threads} threads", 1, opts.threads),
            (f"2 ranks x {per_rank} thread{'s' * (per_rank > 1)}, tensor", 2, per_rank)]


def run_fused(opts: Options, checkpoints: Checkpoints, workdir: Path, rows: list[Row]) -> None:
    for label, world, threads in fused_setups(opts):
        with RankGroup(world, threads, workdir, opts.device) as group:
            for geometry in opts.fused_geometries:
                path = checkpoints.get(geometry)
                for dtype_name in opts.dtypes:
                    load = max(group.call(fused_load_command, str(path), dtype_name))
                    log(f"fused {label} {geometry.label} {dtype_name}: loaded in {load:.1f}s")
                    rows.extend(_fused_cell(opts, group, label, geometry, dtype_name))


def pair_ratios(times: dict[str, list[float]]) -> list[float]:
    """Speed ratio fused / three of each interleaved pair (``three_i / fused_i``): a drift in the machine's
    load between pairs cancels out of each one."""
    return [three / fused for fused, three in zip(times["fused"], times["three"])]


def ratio_text(ratio: float, pairs: list[float]) -> str:
    """``"1.012x (pairs: 1.01, 0.98-1.05)"``: the ratio of the medians, then the median and the range of
    the per-pair ratios (the steadier figure when the machine's load drifts during a cell)."""
    if len(pairs) < 2:
        return f"{ratio:.3f}x"
    return f"{ratio:.3f}x (pairs: {median(pairs):.2f}, {min(pairs):.2f}-{max(pairs):.2f})"


def _fused_cell(opts: Options, group: RankGroup, label: str, geometry: Geometry, dtype_name: str) -> list[Row]:
    """Warm-up and output check, interleaved timed forwards, then the GEMM-only pairs; two rows."""
    image, batch = geometry.image, opts.fused_batch
    warm = {v: group.call(fused_forward_command, v, image, batch, opts.warmup, True)[0] for v in VARIANTS}
    outputs = {v: {k: torch.from_numpy(a) for k, a in warm[v]["outputs"].items()} for v in VARIANTS}
    diff, scale = max_abs_diff(outputs["fused"], outputs["three"]), scale_of(outputs["three"])
    rounds = opts.iterations(warm["fused"]["times"][-1] + warm["three"]["times"][-1])
    rounds = rounds if opts.fixed_iters is not None else max(MIN_PAIRS, rounds)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):  # interleaved: fused, three, fused, three, ...
        for v in VARIANTS:
            times[v].extend(group.call(fused_forward_command, v, image, batch, 1, False)[0]["times"])
    ips = {v: batch / median(times[v]) for v in VARIANTS}
    flops = geometry.flops_per_image()
    ratio, pairs = ips["fused"] / ips["three"], pair_ratios(times)
    log(f"fused {label} {geometry.label} {dtype_name} b{batch}: fused {ips['fused']:.2f} img/s, three "
        f"{ips['three']:.2f} img/s ({ratio_text(ratio, pairs)}), {opts.warmup}+{rounds} rounds, diff {diff:.1e}")
    common = ("fused", geometry.label, dtype_name, str(batch))
    forward_row = Row(
        *common, f"img/s, fused q/k/v vs three q/k/v GEMMs, {label}", f"{ips['fused']:.2f}", f"{ips['three']:.2f}",
        ratio_text(ratio, pairs), gflops_text(ips["fused"] * flops / 1e9, ips["three"] * flops / 1e9, None),
        f"{diff:.1e} fused vs three (outputs up to {scale:.1f})",
        data={"seconds": times, "img_s": ips, "ratio": ratio, "pair_ratios": pairs,
              "pair_ratio_median": median(pairs), "rounds": rounds,
              "max_abs_diff": diff, "output_scale": scale, "warmup_seconds": {v: warm[v]["times"] for v in VARIANTS}},
    )
    return [forward_row, _gemm_row(opts, group, label, geometry, common)]


def _gemm_row(opts: Options, group: RankGroup, label: str, geometry: Geometry, common: tuple) -> Row:
    """The q/k/v projections alone, timed on every rank at once; rank 0's medians."""
    rows = opts.fused_batch * geometry.tokens
    warm = group.call(fused_gemm_command, rows, 1)[0]
    pair = sum(warm["times"][v][0] for v in VARIANTS)
    reps = 1 if opts.quick else max(MIN_PAIRS, min(40, int(2.0 / max(pair, 1e-6))))
    found = group.call(fused_gemm_command, rows, reps)[0]
    rate = {v: found["flops"] / median(found["times"][v]) / 1e9 for v in VARIANTS}
    ratio, pairs = rate["fused"] / rate["three"], pair_ratios(found["times"])
    local = int(found["flops"] / (2 * rows * geometry.hidden))
    log(f"fused {label} {geometry.label} {common[2]}: q/k/v GEMM ({rows}x{geometry.hidden}x{local}) fused "
        f"{rate['fused']:.0f} GFLOP/s, three {rate['three']:.0f} GFLOP/s ({ratio_text(ratio, pairs)}), {reps} pairs")
    return Row(
        *common, f"GFLOP/s, q/k/v projections alone ({rows}x{geometry.hidden} @ {geometry.hidden}x{local}), fused vs "
        f"three, {label}", f"{rate['fused']:.0f}", f"{rate['three']:.0f}", ratio_text(ratio, pairs),
        data={"seconds": found["times"], "gflops": rate, "ratio": ratio, "pair_ratios": pairs,
              "pair_ratio_median": median(pairs), "pairs": reps,
              "shape": [rows, geometry.hidden, local]},
    )


def main(argv: Optional[list[str]] = None) -> int:
    """``bench.py --only fused`` with any further bench.py options."""
    from benchmarks.bench import main as bench_main

    args = list(sys.argv[1:] if argv is None else argv)
    return bench_main(args if "--only" in args else ["--only", "fused", *args])


if __name__ == "__main__":
    sys.exit(main())
