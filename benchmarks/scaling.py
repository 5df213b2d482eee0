"""Section ``scaling``: the same cores as 1 rank x N threads, 2 ranks x N/2 in tensor mode, and in data mode.

base-224 (so400m-384 on GPUs), batch 8, fp32 and bf16. The three set-ups are `RankGroup`s that stay
alive side by side; each loads the checkpoint with ``from_pretrained(world_size=..., parallel=...)``
(tensor mode: a `SiglipVisionTransformer` holding its heads and MLP columns; data mode: a
`tp_siglip.DataParallelEncoder` splitting the batch) and they are timed in turn (round-robin), every
forward between barriers and timed on rank 0. Rank 0's outputs are compared with the 1-rank ones. On
GPUs the ranks talk NCCL, one GPU each, and the section is skipped with fewer than 2 GPUs.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from benchmarks.checkpoints import Checkpoints, load_ours
from benchmarks.common import DTYPES, best_ceiling, log, matmul_ceiling, max_abs_diff, median
from benchmarks.options import Options
from benchmarks.ranks import RankGroup, forward_rounds
from benchmarks.table import Row, at_least, gflops_text

NOTES = ["scaling: spawned ranks (gloo, file:// store); barrier before/after each forward, timed on rank 0, "
         "round-robin over set-ups."]

#: (label, ranks, threads per rank, parallel mode)
Setup = tuple[str, int, int, str]


def load_command(state: dict, path: str, dtype_name: str, parallel: str) -> float:
    """Rank command: load the checkpoint at this group's world size in ``parallel`` mode; seconds taken."""
    state.pop("model", None)
    gc.collect()
    start = time.perf_counter()
    state["model"] = load_ours(Path(path), DTYPES[dtype_name], state["device"], world_size=state["world"],
                               parallel=parallel)
    return time.perf_counter() - start


def forward_command(state: dict, image: int, batch: int, rounds: int, keep_outputs: bool) -> dict:
    """Rank command: timed forwards of the loaded model (see `ranks.forward_rounds`)."""
    return forward_rounds(state, state["model"], image, batch, rounds, keep_outputs)


def scaling_setups(opts: Options) -> tuple[list[Setup], list[str]]:
    """The set-ups to compare (the first is the baseline) and the dtypes to run them in."""
    ranks = opts.scaling_ranks
    if opts.device.type == "cuda":
        return [("1 GPU", 1, 1, "tensor"), (f"{ranks} GPUs, tensor", ranks, 1, "tensor"),
                (f"{ranks} GPUs, data", ranks, 1, "data")], ["bf16"]
    total = opts.threads
    per_rank = max(1, total // ranks)
    threads = f"{per_rank} thread{'s' * (per_rank > 1)}"
    return [
        (f"1 rank x {total} threads", 1, total, "tensor"),
        (f"{ranks} ranks x {threads}, tensor", ranks, per_rank, "tensor"),
        (f"{ranks} ranks x {threads}, data", ranks, per_rank, "data"),
    ], ["fp32", "bf16"]


def run_scaling(opts: Options, checkpoints: Checkpoints, workdir: Path, rows: list[Row]) -> None:
    geometry, ranks = opts.scaling_geometry, opts.scaling_ranks
    if opts.device.type == "cuda" and torch.cuda.device_count() < ranks:
        rows.append(Row("scaling", geometry.label, "bf16", str(opts.scaling_batch), f"1 GPU vs {ranks} GPUs (NCCL)",
                        "skipped", "", "", max_diff=f"only {torch.cuda.device_count()} GPU(s)"))
        log("scaling: skipped (fewer than 2 GPUs)")
        return
    setups, dtypes = scaling_setups(opts)
    path = checkpoints.get(geometry)
    groups: list[RankGroup] = []
    try:
        start = time.perf_counter()
        for _, world, threads, _ in setups:
            groups.append(RankGroup(world, threads, workdir, opts.device))
        for dtype_name in dtypes:
            loads = [max(group.call(load_command, str(path), dtype_name, setup[3])) for group, setup in zip(groups, setups)]
            log(f"scaling {dtype_name}: ranks up and loaded in {time.perf_counter() - start:.1f}s "
                f"(load {', '.join(f'{s:.1f}s' for s in loads)})")
            rows.extend(_scaling_cell(opts, groups, setups, dtype_name, loads))
    finally:
        for group in groups:
            group.close()


def _scaling_cell(opts: Options, groups: list[RankGroup], setups: list[Setup], dtype_name: str,
                  loads: list[float]) -> list[Row]:
    """Warm-up, round-robin timing (1 rank, tensor, data, 1 rank, ...) and one row per set-up."""
    geometry, batch, device = opts.scaling_geometry, opts.scaling_batch, opts.device
    gemm = (batch * geometry.tokens, geometry.hidden, geometry.intermediate)
    ceiling = matmul_ceiling(*gemm, DTYPES[dtype_name], device)  # the ranks are idle now
    warm = [group.call(forward_command, geometry.image, batch, opts.warmup, True)[0] for group in groups]
    rounds = opts.iterations(sum(w["times"][-1] for w in warm))
    times: list[list[float]] = [[] for _ in groups]
    for _ in range(rounds):
        for i, group in enumerate(groups):
            times[i].extend(group.call(forward_command, geometry.image, batch, 1, False)[0]["times"])
    ceiling = best_ceiling(ceiling, matmul_ceiling(*gemm, DTYPES[dtype_name], device))
    outputs = [{k: torch.from_numpy(v) for k, v in w["outputs"].items()} for w in warm]
    base_ips, flops = batch / median(times[0]), geometry.flops_per_image()
    rows = []
    for i, (label, world, _, parallel) in enumerate(setups):
        ips = batch / median(times[i])
        ratio, diff = ips / base_ips, max_abs_diff(outputs[i], outputs[0])
        target, met = ("", "") if world == 1 else at_least(ratio, 0.9)
        rows.append(Row(
            "scaling", geometry.label, dtype_name, str(batch),
            f"img/s, {label}" + (" (baseline)" if i == 0 else f" vs {setups[0][0]}"),
            f"{ips:.2f}", f"{base_ips:.2f}", f"{ratio:.2f}x", gflops_text(ips * flops / 1e9, None, ceiling["gflops"]),
            "(baseline)" if i == 0 else f"{diff:.1e} vs 1 rank", target, met,
            {"seconds": times[i], "img_s": ips, "ratio": ratio, "world": world, "parallel": parallel,
             "load_seconds": loads[i], "max_abs_diff_vs_1_rank": diff, "ceiling": ceiling},
        ))
        log(f"scaling {dtype_name} {label}: {ips:.2f} img/s ({ratio:.2f}x), {rounds} rounds, diff {diff:.1e}")
    return rows
