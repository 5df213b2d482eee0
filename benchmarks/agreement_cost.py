"""What the per-forward input agreement costs: 2 gloo ranks on this CPU, base-224 batch-8 pixels.

    python benchmarks/agreement_cost.py [--ranks 2] [--batch 8] [--iters 200]

Only the input checks run, no encoder (a base-224 image/patch config with a tiny hidden size, which the
checks never read). Each rank times per call: the local checks alone (what a rank does without a group),
`agree_on_inputs` in the default ``"shapes"`` mode and in ``"checksum"`` mode, `tensor_checksum` alone,
the same with ``check_finite=False`` (so that the NaN/inf scan, a local cost every mode pays, does not
hide the agreement's own), the agreement's Python work without its collective, and a bare 1 KiB
all-gather. Rank 0 prints microseconds per call (best of 7 rounds).

With the scan on, "agree" minus "local checks" overstates the cost on a busy machine: the all-gather
makes each call wait for the slower rank, which a real forward does anyway at its first all-reduce.
"local checks + bare all-gather" is that lock-step baseline.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _per_call_us(fn, iters: int) -> float:
    """Microseconds per call: the best of 7 rounds (the least disturbed by other processes)."""
    rounds = []
    for _ in range(7):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        rounds.append((time.perf_counter() - start) / iters * 1e6)
    return min(rounds)


def _rank(rank: int, world_size: int, store: str, batch: int, iters: int) -> None:
    from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer
    from tp_siglip.parallel import agree_on_inputs, input_signature, side_group, tensor_checksum
    from tp_siglip.parallel.agreement import _input_verdict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    config = SiglipVisionConfig(image_size=224, patch_size=16, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2)
    model = SiglipVisionTransformer(config).eval()  # no group: only used for its local checks
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    group = dist.group.WORLD
    mine, everyone = torch.zeros(1024, dtype=torch.uint8), torch.empty(1024 * world_size, dtype=torch.uint8)
    side = side_group(group)  # where the agreement's all-gather runs

    def all_gather_flat(out: torch.Tensor, row: torch.Tensor, _group: object) -> None:
        dist.all_gather_into_tensor(out, row, group=side)

    def check():
        return model.check_inputs(pixels, None, False)

    def verdict_only():  # the agreement's Python work with the collective left out
        return _input_verdict([(False, input_signature(check()).encode().decode())] * world_size, group)

    times = {}
    times["local checks (with the NaN/inf scan)"] = _per_call_us(lambda: agree_on_inputs(None, check), iters)
    times["local checks + bare all-gather"] = _per_call_us(lambda: (check(), all_gather_flat(everyone, mine, group)), iters)
    times["agree, 'shapes' (with the scan)"] = _per_call_us(lambda: agree_on_inputs(group, check), iters)
    times["agree, 'checksum' (with the scan)"] = _per_call_us(lambda: agree_on_inputs(group, check, mode="checksum"), iters)
    times["tensor_checksum(pixels) alone"] = _per_call_us(lambda: tensor_checksum(pixels), iters)
    model.check_finite = False
    times["local checks, check_finite=False"] = _per_call_us(lambda: agree_on_inputs(None, check), iters)
    times["agree 'shapes', check_finite=False"] = _per_call_us(lambda: agree_on_inputs(group, check), iters)
    times["signature + verdict, no collective"] = _per_call_us(verdict_only, iters)
    times["bare 1 KiB all-gather"] = _per_call_us(lambda: all_gather_flat(everyone, mine, group), iters)
    assert verdict_only() == ""
    if rank == 0:
        print(f"{world_size} gloo ranks, 1 thread each, pixels {tuple(pixels.shape)} float32; us per call:")
        for name, us in times.items():
            print(f"  {name:40s} {us:9.1f}")
        own = times["agree 'shapes', check_finite=False"] - times["local checks, check_finite=False"]
        print(f"  => the default agreement adds {own:.0f} us per forward (one all-gather: "
              f"{times['bare 1 KiB all-gather']:.0f} us); 'checksum' adds {times['tensor_checksum(pixels) alone']:.0f} us more")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(args.ranks, os.path.join(tmp, "store"), args.batch, args.iters),
                           nprocs=args.ranks, start_method="spawn")


if __name__ == "__main__":
    main()
