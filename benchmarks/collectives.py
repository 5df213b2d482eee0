"""What one forward asks of the device group and of the host, per world size: the GPU path's schedule table.

    python benchmarks/collectives.py                    # CPU: gloo ranks on the torch.distributed path (as NCCL)
    python benchmarks/collectives.py --device cuda      # the GPU check: NCCL over min(2, GPUs) ranks, and the
                                                        # forward under torch.cuda.set_sync_debug_mode("error")

For a plain tensor-parallel forward and for a batch split by rows (``batch_sizes``), it prints the bytes one
rank sends on the device group (ring model, `schedule.ring_bytes`) divided by those of plain TP's
all-reduces measured in the same run, the collectives on the device group that carry no activations
(bookkeeping: should be 0), those on the CPU side group, and the host-sync ops (`schedule.SyncOpLog`; on
CUDA also whether ``set_sync_debug_mode("error")`` let the forward through). Two geometries: a 2-layer
tower (the tests') and one shaped like so400m (27 layers, 16 heads, 16x16 patches of 224 px) but narrow,
so the table runs in seconds: the ratios depend on the depth, the head and the split, not on the width.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.schedule import CollectiveLog, SyncOpLog, ring_bytes

GEOMETRIES = {
    "2 layers, 4 heads, 32 px": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    ),
    "so400m-shaped (27 layers, 16 heads, 224 px), narrow": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=27, num_attention_heads=16, image_size=224, patch_size=14
    ),
}
BATCH = 8


def _forward_rows(model, pixels, mine, sizes, device_group, side):
    rows = {}
    for name, call in (("plain", lambda: model(pixels)), ("split", lambda: model(mine, batch_sizes=sizes))):
        call()  # set-up (side group, buffers) happens in the first call
        with CollectiveLog() as log, SyncOpLog() as syncs:
            call()
        data = [c for c in log.on(device_group) if c.floating]
        rows[name] = {
            "ring": sum(ring_bytes(c, dist.get_world_size(device_group)) for c in data),
            "bookkeeping": len(log.on(device_group)) - len(data),
            "side": len(log.on(side)) if side is not None else "-",
            "syncs": len(syncs.seen),
            "debug_mode": _sync_debug_ok(call) if pixels.is_cuda else "",
            "padding": len(sizes) * max(sizes) / sum(sizes) if name == "split" else 1.0,
        }
    return rows


def _device_default(model) -> bool:
    """Whether the library's default value checks read a GPU input (the CPU ranks stand in for GPUs)."""
    try:
        from tp_siglip.checks import reads_values
    except ImportError:  # older trees: the finiteness check read the pixels on every device
        return bool(model.check_finite)
    return reads_values(model.check_finite, torch.empty(0, device="meta"))


def _sync_debug_ok(call) -> str:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
        return "passed"
    except RuntimeError as err:
        return f"FAILED: {str(err).splitlines()[0][:80]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _rank(rank: int, world: int, store: str, device_name: str, results) -> None:
    from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer, parallel

    cuda = device_name == "cuda"
    torch.set_num_threads(1)
    os.environ["TP_SIGLIP_SHM_ALLREDUCE"] = "0"  # CPU ranks take the torch.distributed path, as NCCL would
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    try:
        for geometry, config in GEOMETRIES.items():
            model = SiglipVisionTransformer(SiglipVisionConfig(**config), dist.group.WORLD, device=device).eval()
            size = config["image_size"]
            pixels = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
            sizes = [BATCH // world + (1 if r < BATCH % world else 0) for r in range(world)]
            mine = pixels[sum(sizes[:rank]) : sum(sizes[: rank + 1])]
            if not cuda:
                model.check_finite = _device_default(model)  # CPU ranks stand in for GPUs: the default a GPU input gets
            with torch.inference_mode():
                side = parallel.side_group(dist.group.WORLD) if hasattr(parallel, "side_group") else None  # older trees: none
                rows = _forward_rows(model, pixels, mine, sizes, dist.group.WORLD, side)
            if rank == 0:
                results.put((geometry, world, rows))
    finally:
        dist.destroy_process_group()


def measure(worlds: list[int], device_name: str) -> list[tuple[str, int, dict]]:
    results = mp.get_context("spawn").SimpleQueue()
    out = []
    for world in worlds:
        store = tempfile.mktemp(prefix="tp-siglip-collectives-")
        mp.start_processes(_rank, args=(world, store, device_name, results), nprocs=world, start_method="spawn")
        while not results.empty():
            out.append(results.get())
    return out


def table(measured: list[tuple[str, int, dict]]) -> str:
    lines = [
        "| geometry | ranks | forward | device-group bytes / plain TP's | the same without padding rows | bookkeeping on device group "
        "| side-group collectives | host-sync ops | sync debug mode |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for geometry, world, rows in measured:
        base = rows["plain"]["ring"]
        for name, row in rows.items():
            ratio = f"{row['ring'] / base:.3f} | {row['ring'] / base / row['padding']:.3f}" if base else "- (one rank) | -"
            lines.append(
                f"| {geometry} | {world} | {name} | {ratio} | "
                f"{row['bookkeeping']} | {row['side']} | "
                f"{row['syncs']} | {row['debug_mode'] or 'CPU'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="only the 2-layer tower (the CPU rehearsal)")
    parser.add_argument("--worlds", default="2,3", help="world sizes on the CPU (comma list); CUDA uses min(2, GPUs):"
                        " NCCL cannot put two ranks on one GPU")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        worlds = [min(2, torch.cuda.device_count())]
    else:
        worlds = [int(w) for w in args.worlds.split(",")]
    if args.quick:
        del GEOMETRIES[next(reversed(GEOMETRIES))]
    print(f"split batch: {BATCH} images dealt over the ranks; bytes: what one rank sends on a ring")
    print(table(measure(worlds, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
