"""Section ``memory``: load time, parameter bytes and peak RSS growth of ``from_pretrained``, per rank.

so400m-384 with all 27 layers (fp32 checkpoint ~1.7 GB): ours at 1 rank and at 2 ranks (tensor mode)
and transformers' ``SiglipVisionModel.from_pretrained`` at 1 process, each in fresh spawned processes.
Peak RSS growth while loading = ``VmHWM`` after loading minus ``VmRSS`` just before
(``/proc/self/status``). Before the baseline each process loads a tiny checkpoint once (lazy imports are
not what we measure) and, where the kernel allows it, resets its high-water mark through
``/proc/self/clear_refs``. transformers 5 keeps same-dtype safetensors weights memory-mapped (read at
first use), so extra rows also time one read of every parameter after loading and the peak RSS growth
including it.
"""

from __future__ import annotations

import gc
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks.checkpoints import Checkpoints, load_ours, load_theirs
from benchmarks.common import PRIMER, gb, log, sync
from benchmarks.options import Options
from benchmarks.ranks import RankGroup, barrier
from benchmarks.table import Row, at_most

NOTES = ["memory: fresh process per rank; peak RSS growth = VmHWM after from_pretrained - VmRSS just before; the "
         "'one read of every parameter' rows add a sum over each parameter (transformers mmaps same-dtype weights)."]
RANKS = 2


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


def measure_load_command(state: dict, kind: str, path: str, primer: str) -> dict:
    """Rank command: load time, parameter bytes and peak RSS growth of one from_pretrained (fresh process)."""
    device, world = state["device"], state["world"]

    def load(where: str) -> torch.nn.Module:
        if kind == "transformers":
            return load_theirs(Path(where), torch.float32, device)
        return load_ours(Path(where), torch.float32, device, world_size=world)

    primed = load(primer)  # lazy imports and first-call set-up are not what we measure
    del primed
    gc.collect()
    barrier(state)
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
        "load_seconds": seconds, "touch_seconds": touch_seconds, "param_bytes": param_bytes(model),
        "rss_before": before["VmRSS"], "hwm_before": before["VmHWM"], "hwm_after": after["VmHWM"],
        "rss_after": after["VmRSS"], "anon_growth": after["RssAnon"] - before["RssAnon"],
        "file_growth": after["RssFile"] - before["RssFile"], "peak_growth": after["VmHWM"] - before["VmRSS"],
        "peak_growth_touched": touched["VmHWM"] - before["VmRSS"], "hwm_reset": reset,
    }
    if device.type == "cuda":
        result["gpu_peak_growth"] = torch.cuda.max_memory_allocated(device) - gpu_before
    barrier(state)
    return result


def _measure_all(opts: Options, checkpoints: Checkpoints, workdir: Path) -> dict[str, list[dict]]:
    """``ours-1``, ``ours-2`` (when 2 ranks are possible) and ``transformers-1``: per-rank measurements."""
    path, primer = checkpoints.get(opts.memory_geometry), checkpoints.get(PRIMER)
    plan = [("ours-1", "ours", 1, opts.threads), ("transformers-1", "transformers", 1, opts.threads)]
    if opts.device.type == "cpu" or torch.cuda.device_count() >= RANKS:
        plan.insert(1, ("ours-2", "ours", RANKS, max(1, opts.threads // RANKS)))
    measured: dict[str, list[dict]] = {}
    for key, kind, world, threads in plan:
        with RankGroup(world, threads, workdir, opts.device) as group:
            measured[key] = group.call(measure_load_command, kind, str(path), str(primer))
        per_rank = ", ".join(
            f"rank {r}: {m['load_seconds']:.1f}s, params {gb(m['param_bytes'])}, peak +{gb(m['peak_growth'])}"
            for r, m in enumerate(measured[key])
        )
        log(f"memory {key}: {per_rank}")
    return measured


def run_memory(opts: Options, checkpoints: Checkpoints, workdir: Path, rows: list[Row]) -> None:
    measured = _measure_all(opts, checkpoints, workdir)
    all_reset = all(m["hwm_reset"] for ms in measured.values() for m in ms)
    method = "VmHWM reset via clear_refs" if all_reset else "VmHWM - VmRSS before"
    common = dict(section="memory", geometry=opts.memory_geometry.label, dtype="fp32", batch="-")

    def add(setup: str, ours: str, ref: str, ratio: float, note: str = "", bound: Optional[float] = None,
            data: Optional[dict] = None) -> None:
        target, met = at_most(ratio, bound) if bound is not None else ("", "")
        rows.append(Row(**common, setup=setup, ours=ours, reference=ref, ratio=f"{ratio:.2f}x",
                        max_diff=note, target=target, met=met, data=data or {}))

    _one_rank_rows(add, measured["ours-1"][0], measured["transformers-1"][0], method, opts.device.type == "cuda")
    if "ours-2" in measured:
        _two_rank_rows(add, measured["ours-1"][0], measured["ours-2"], method)
    else:
        add(f"{RANKS} ranks", "skipped", "", float("nan"), note=f"needs {RANKS} GPUs")


def _one_rank_rows(add: Callable[..., None], one: dict, tf: dict, method: str, gpu: bool) -> None:
    add("load time, ours 1 rank vs transformers", f"{one['load_seconds']:.2f} s", f"{tf['load_seconds']:.2f} s",
        one["load_seconds"] / tf["load_seconds"], data={"ours": one, "transformers": tf})
    add("params held, ours 1 rank vs transformers", gb(one["param_bytes"]), gb(tf["param_bytes"]),
        one["param_bytes"] / tf["param_bytes"])
    lazy = tf["anon_growth"] < tf["param_bytes"] // 2 and not gpu  # parameters not in anonymous memory
    lazy_note = "; transformers' weights stay mmap-ed, read at first use" if lazy else ""
    add("peak RSS growth while loading, ours 1 rank vs transformers", gb(one["peak_growth"]), gb(tf["peak_growth"]),
        one["peak_growth"] / max(tf["peak_growth"], 1), note=method + lazy_note)
    add("load + one read of every parameter, ours 1 rank vs transformers",
        f"{one['load_seconds'] + one['touch_seconds']:.2f} s", f"{tf['load_seconds'] + tf['touch_seconds']:.2f} s",
        (one["load_seconds"] + one["touch_seconds"]) / (tf["load_seconds"] + tf["touch_seconds"]))
    add("peak RSS growth after load + one read of every parameter, ours 1 rank vs transformers",
        gb(one["peak_growth_touched"]), gb(tf["peak_growth_touched"]),
        one["peak_growth_touched"] / max(tf["peak_growth_touched"], 1),
        note=f"RSS growth anon/file after load: ours {gb(one['anon_growth'])}/{gb(one['file_growth'])}, "
        f"tf {gb(tf['anon_growth'])}/{gb(tf['file_growth'])}")
    if gpu:
        add("GPU peak growth while loading, ours 1 rank vs transformers", gb(one["gpu_peak_growth"]),
            gb(tf["gpu_peak_growth"]), one["gpu_peak_growth"] / max(tf["gpu_peak_growth"], 1))


def _two_rank_rows(add: Callable[..., None], one: dict, two: list[dict], method: str) -> None:
    label = f"{RANKS} ranks (rank " + " / ".join(str(r) for r in range(RANKS)) + ") vs 1 rank"
    param_ratios = [m["param_bytes"] / one["param_bytes"] for m in two]
    growth_ratios = [m["peak_growth"] / max(one["peak_growth"], 1) for m in two]
    time_ratios = [m["load_seconds"] / one["load_seconds"] for m in two]

    def slash(values: list[Any], fmt: Callable[[Any], str]) -> str:
        return " / ".join(fmt(v) for v in values)

    add(f"params held per rank, {label}", slash([m["param_bytes"] for m in two], gb), gb(one["param_bytes"]),
        max(param_ratios), note="ratio: largest rank", bound=0.55, data={"ranks": two, "ratios": param_ratios})
    add(f"peak RSS growth while loading per rank, {label}", slash([m["peak_growth"] for m in two], gb),
        gb(one["peak_growth"]), max(growth_ratios), note=f"largest rank; {method}", bound=0.6,
        data={"ratios": growth_ratios})
    add(f"load time per rank, {label}", slash([m["load_seconds"] for m in two], lambda s: f"{s:.2f} s"),
        f"{one['load_seconds']:.2f} s", max(time_ratios), note="slowest rank", data={"ratios": time_ratios})
