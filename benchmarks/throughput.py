"""Section ``throughput``: images per second, ours (one rank, every thread) vs transformers, same process.

For each geometry and dtype both models are loaded once from the same checkpoint (plus, unless
``--no-compile``, a ``torch.compile``-d copy of ours); then for each batch size one cell: warm-up
forwards of both, then timed forwards interleaved ours, transformers(, compiled), ours, ... with the
medians reported. The number of timed rounds adapts to the cell's cost (`Options.iterations`); a cell
whose single forward is predicted to be long skips its warm-up (`Options.warmup_rounds`). The first
outputs of each model are compared (`common.parity`; in bf16 also against transformers' fp32 outputs
on the same input, kept from the fp32 cell). A matmul ceiling at the model's largest GEMM is timed
just before and just after each cell; the higher one is the GFLOP/s column's yardstick.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Optional

import torch

from benchmarks.checkpoints import Checkpoints, load_ours, load_theirs
from benchmarks.common import DTYPES, Geometry, best_ceiling, log, matmul_ceiling, median, outputs_of, parity, pixels, timed
from benchmarks.options import Options
from benchmarks.table import Row, at_least, gflops_text

NOTES = [
    "throughput: medians of interleaved forwards (ours, transformers, ...) after warm-up, torch.inference_mode(), "
    "same checkpoint; transformers uses attn_implementation as shown in the set-up column.",
    "GFLOP/s: analytic model FLOPs (2*T*(4D^2+2DF) + 4*T^2*D per layer, + patch conv + head) x img/s; "
    "'of N' is the F.linear ceiling (B*T, D) @ (D, F) at the same dtype and threads, timed just before and just "
    "after the cell (the higher kept).",
    "max abs diff: over last_hidden_state and pooler_output; bf16 also against transformers' fp32 outputs.",
]


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
            models = {"ours": ours, "theirs": theirs, "compiled": compiled, "attn": attn}
            previous: Optional[tuple[int, float]] = None  # (batch, seconds of one ours+theirs pair)
            for batch in batches:
                new_rows = throughput_cell(opts, models, geometry, dtype_name, batch, fp32_refs, previous)
                rows.extend(new_rows)
                previous = (batch, new_rows[0].data["ours_seconds_median"] + new_rows[0].data["theirs_seconds_median"])
            del ours, theirs, compiled, models
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _time_cell(opts: Options, models: dict, x: torch.Tensor, warmup: int, previous: Optional[tuple[int, float]]) -> dict:
    """Warm-up pairs, then interleaved timed rounds; the first outputs of each model are kept."""
    device, compiled, batch = opts.device, models["compiled"], x.shape[0]
    runs = {"ours": lambda: models["ours"](x), "theirs": lambda: models["theirs"](pixel_values=x)}
    found: dict[str, Any] = {"ours": None, "theirs": None, "compiled": None, "warm": []}
    times: dict[str, list[float]] = {"ours": [], "theirs": [], "compiled": []}

    def pair() -> tuple[float, float]:
        spent = []
        for name in ("ours", "theirs"):
            seconds, out = timed(runs[name], device)
            found[name] = found[name] or outputs_of(out)
            del out
            spent.append(seconds)
        return spent[0], spent[1]

    with torch.inference_mode():
        if compiled is not None:  # compile (or recompile for this batch) outside the timed rounds
            start = time.perf_counter()
            found["compiled"] = outputs_of(compiled(x))
            compiled(x)
            found["compile_seconds"] = time.perf_counter() - start
        found["warm"] = [pair() for _ in range(warmup)]
        per_round = sum(found["warm"][-1]) if found["warm"] else previous[1] * batch / previous[0]
        found["rounds"] = opts.iterations(per_round)
        for _ in range(found["rounds"]):
            t_ours, t_theirs = pair()
            times["ours"].append(t_ours)
            times["theirs"].append(t_theirs)
            if compiled is not None:
                times["compiled"].append(timed(lambda: compiled(x), device)[0])
    found["times"] = times
    return found


def throughput_cell(opts: Options, models: dict, geometry: Geometry, dtype_name: str, batch: int,
                    fp32_refs: dict, previous: Optional[tuple[int, float]]) -> list[Row]:
    """One (geometry, dtype, batch) cell: the eager row, then the compiled row when there is one."""
    device, dtype = opts.device, DTYPES[dtype_name]
    x = pixels(batch, geometry.image, seed=1000 + batch, device=device)
    gemm = (batch * geometry.tokens, geometry.hidden, geometry.intermediate)
    ceiling = matmul_ceiling(*gemm, dtype, device)
    warmup = opts.warmup_rounds(batch, previous)
    found = _time_cell(opts, models, x, warmup, previous)
    if "compile_seconds" in found:
        log(f"{geometry.label} {dtype_name} b{batch}: torch.compile warm-up {found['compile_seconds']:.0f}s")
    if dtype_name == "fp32":
        fp32_refs[(geometry, batch)] = found["theirs"]
    reference = fp32_refs.get((geometry, batch))
    check = parity(found["ours"], found["theirs"], dtype_name, reference)
    compiled_check = parity(found["compiled"], found["theirs"], dtype_name, reference) if found["compiled"] else None
    ceiling = best_ceiling(ceiling, matmul_ceiling(*gemm, dtype, device))
    return _cell_rows(opts, models["attn"], geometry, dtype_name, batch, found, check, compiled_check, ceiling)


def _cell_rows(opts: Options, attn: str, geometry: Geometry, dtype_name: str, batch: int, found: dict,
               check: dict, compiled_check: Optional[dict], ceiling: dict) -> list[Row]:
    times, device = found["times"], opts.device
    ips_ours, ips_theirs = batch / median(times["ours"]), batch / median(times["theirs"])
    flops = geometry.flops_per_image()
    g_ours, g_theirs = ips_ours * flops / 1e9, ips_theirs * flops / 1e9
    speedup = ips_ours / ips_theirs
    threads = f"{opts.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    log(
        f"{geometry.label} {dtype_name} b{batch}: ours {ips_ours:.2f} img/s, transformers {ips_theirs:.2f} img/s "
        f"({speedup:.2f}x), {len(found['warm'])}+{found['rounds']} rounds, mm ceiling {ceiling['gflops']:.0f} GFLOP/s, "
        f"diff {check['text']}"
    )

    def row(setup: str, ips: float, diff: str, data: dict) -> Row:
        ratio = ips / ips_theirs
        target, met = at_least(ratio, 1.05 if dtype_name == "fp32" else 1.2) if device.type == "cpu" else ("", "")
        return Row("throughput", geometry.label, dtype_name, str(batch), setup, f"{ips:.2f}", f"{ips_theirs:.2f}",
                   f"{ratio:.2f}x", gflops_text(ips * flops / 1e9, g_theirs, ceiling["gflops"]), diff, target, met, data)

    rows = [row(f"img/s, 1 rank x {threads} vs transformers ({attn})", ips_ours, check["text"], {
        "ours_seconds": times["ours"], "theirs_seconds": times["theirs"], "warmup_seconds": found["warm"],
        "ours_seconds_median": median(times["ours"]), "theirs_seconds_median": median(times["theirs"]),
        "ours_img_s": ips_ours, "theirs_img_s": ips_theirs, "speedup": speedup, "flops_per_image": flops,
        "ours_gflops": g_ours, "theirs_gflops": g_theirs, "ceiling": ceiling,
        "parity": {k: v for k, v in check.items() if k != "text"}, "attn_implementation": attn,
        "threads": opts.threads,
    })]
    if times["compiled"]:
        ips_c = batch / median(times["compiled"])
        log(f"{geometry.label} {dtype_name} b{batch}: ours + torch.compile {ips_c:.2f} img/s ({ips_c / ips_theirs:.2f}x)")
        rows.append(row(f"img/s, ours + torch.compile, 1 rank x {threads} vs transformers ({attn}, eager)", ips_c,
                        compiled_check["text"],
                        {"compiled_seconds": times["compiled"], "compiled_img_s": ips_c, "speedup": ips_c / ips_theirs}))
    return rows
