#!/usr/bin/env python
"""Does each piece of the encode job's CPU-only machinery pay? Each piece against its plain alternative, in one run.

    python benchmarks/machinery.py                    # the A/B table (~15 min on 2 cores)
    python benchmarks/machinery.py --quick            # smoke run: 64 images, one round, tiny tower only

The pieces, each switched off in the job's own processes (this script is also the rank entry point: it
applies the switches, then runs ``tp_siglip.encode.main``):

* ``main_threads``: `pipeline.MainThreads` replaced by nothing (the model keeps torch's thread count);
* ``decode_ring``: the decode workers hand back whole portions through DataLoader's own transport (tensors
  pickled into shared memory by torch's reductions; ``pin_memory`` for a CUDA model), one portion per worker,
  instead of writing their pieces of every portion into `decode_ring.DecodeRing` (`plain_decoded_portions`).

The pieces this script measured and that were then removed (the named-pipe barrier, ``gc.freeze()``
around starting the workers, the one-core branch of the default ``--workers``): see
``benchmarks/results/2026-12-07-encode-machinery-ab.md``, which says how each was switched off.

Configurations a user runs: 1 rank and 2 data-parallel ranks (the default ``--tp 1``), with the near-free
stand-in tower (decode-bound: the machinery's best case) and base-224 fp32 (model-bound, random weights).
Rows are interleaved: each round runs every variant once, and each variant reports its fastest round and
every round (other tenants' load only slows a run down). A piece pays when "on" is >= 5 % faster than "off".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Geometry
from benchmarks.pipeline import RATE, ROOT, TINY, make_checkpoint, make_jpegs

PIECES = ("main_threads", "decode_ring")
PAYS = 1.05


class _NoThreads:
    """`pipeline.MainThreads` switched off: the model keeps its threads."""

    def __init__(self, active: bool) -> None:
        pass

    def update(self, decode_seconds: float) -> None:
        pass

    def restore(self) -> None:
        pass


def plain_decoded_portions(decoder: Any, workers: int, *, pin_memory: bool = False, borrowed: bool = False) -> Any:
    """`pipeline.decoded_portions` without the ring: DataLoader's own transport, one whole portion per item."""
    import torch

    from tp_siglip import pipeline

    if workers == 0 or not len(decoder):
        yield from (decoder[index] for index in range(len(decoder)))
        return
    loader = torch.utils.data.DataLoader(decoder, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                         prefetch_factor=pipeline.PREFETCH_PER_WORKER, worker_init_fn=pipeline._worker_init,
                                         collate_fn=lambda item: item)  # fmt: skip
    yield from loader


def run_as_job(off: list[str], argv: list[str]) -> int:
    """Rank entry point: switch ``off`` the named pieces in this process, then run the job."""
    from tp_siglip import encode, pipeline

    if "main_threads" in off:
        pipeline.MainThreads = _NoThreads
    if "decode_ring" in off:
        pipeline.decoded_portions = plain_decoded_portions
    return encode.main(argv)


def job_rate(images: Path, checkpoint: Path, ranks: int, off: list[str], extra: list[str], output: Path, cores: str = "") -> float:
    """Images/s of one fresh run (the job's own throughput line: load excluded)."""
    launcher = ["taskset", "-c", cores] if cores else []
    launcher += [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone"]
    command = [*launcher, str(Path(__file__).resolve()), "--as-job", ",".join(off) or "-", "--",
               str(images), "--model", str(checkpoint), "--output", str(output), "--batch-size", "32", *extra]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TP_SIGLIP_PG_TIMEOUT_S": "300"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    found = RATE.search(done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    output.unlink(missing_ok=True)
    return float(found.group(3))


def variants(ranks: int) -> list[tuple[str, list[str], list[str], str]]:
    """``(label, pieces off, extra options, cores)`` for one rank count: everything on, then each piece off."""
    return [("all on", [], [], "")] + [(f"{piece} off", [piece], [], "") for piece in PIECES]


def measure(root: Path, images: Path, checkpoint: Path, name: str, rounds: int) -> list[dict[str, Any]]:
    """Every variant at 1 and 2 ranks, ``rounds`` interleaved rounds."""
    plan = [(ranks, *variant) for ranks in (1, 2) for variant in variants(ranks)]
    rates: dict[tuple[int, str], list[float]] = {(ranks, label): [] for ranks, label, *_ in plan}
    for _ in range(rounds):
        for ranks, label, off, extra, cores in plan:
            rates[ranks, label].append(job_rate(images, checkpoint, ranks, off, extra, root / "out.safetensors", cores))
            print(f"{name}, {ranks} rank(s), {label}: {rates[ranks, label][-1]:.1f} img/s", file=sys.stderr, flush=True)
    rows = []
    for ranks in (1, 2):
        on = max(rates[ranks, "all on"])
        for (count, label), got in rates.items():
            if count == ranks:
                paired = sorted(on_rate / rate for on_rate, rate in zip(rates[ranks, "all on"], got))
                rows.append({"tower": name, "ranks": ranks, "variant": label, "best": max(got), "rounds": got,
                             "on_over_off": on / max(got), "paired": paired[len(paired) // 2]})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| tower | ranks | variant | img/s (fastest round) | each round | on / off, fastest rounds | on / off, median of "
             "the rounds' ratios | pays (>= 1.05)? |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        compared = r["variant"] != "all on"
        ratio = f"{r['on_over_off']:.3f} | {r['paired']:.3f}" if compared else " | "
        pays = ("yes" if min(r["on_over_off"], r["paired"]) >= PAYS else "no") if compared else ""
        each = "/".join(f"{rate:.1f}" for rate in r["rounds"])
        lines.append(f"| {r['tower']} | {r['ranks']} | {r['variant']} | {r['best']:.1f} | {each} | {ratio} | {pays} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--as-job"]:
        off = [] if argv[1] == "-" else argv[1].split(",")
        return run_as_job(off, argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 images, one round, the tiny tower only")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=800, help="JPEGs for the tiny tower (base-224 gets 64)")
    parser.add_argument("--tiny-only", action="store_true", help="skip the base-224 rows")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tp-siglip-machinery-") as folder:
        root = Path(folder)
        count, rounds = (64, 1) if opts.quick else (opts.images, opts.rounds)
        make_jpegs(root / "images", count)
        tiny = make_checkpoint(Geometry("tiny-224", *TINY["p32"], 224), root / "tiny")
        rows = measure(root, root / "images", tiny, "tiny-224 (near-free)", rounds)
        if not (opts.quick or opts.tiny_only):
            make_jpegs(root / "few", 64, seed=1)
            base = make_checkpoint(Geometry("base-224", 768, 3072, 12, 12, 16, 224), root / "base")
            rows += measure(root, root / "few", base, "base-224 fp32 (model-bound)", max(1, rounds - 1))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
