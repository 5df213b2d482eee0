#!/usr/bin/env python
"""Corpus runs of ``tp-siglip encode --output DIR``: do groups of ranks scale, and does rank 0 stay flat?

    python benchmarks/corpus.py                 # ~2 min on 2 cores
    python benchmarks/corpus.py --quick         # smoke run

Everything is generated here: JPEGs of 500-800 px packed into img2dataset-style webdataset tars
(``KEY.jpg`` + ``KEY.json`` + ``KEY.txt``), a tiny random tower (its forward costs almost nothing: the job is
bound by decoding), each job a fresh process (``torch.distributed.run`` for 2 ranks). Rows:

* **groups**: 4 shards x 200 images; 2 ranks ``--tp 1`` (two groups, each taking whole shards) vs one
  group of one rank, both with ``--workers 0`` (each rank decodes in its own process, so the comparison
  is of groups, not of decode workers) and with the default ``--workers``: target >= 1.7x for the
  former; both runs must hold the same keys with the same rows (checked here, by key: bit-identical when
  both use the same intra-op thread count; torchrun gives each rank one thread, a lone rank uses every core,
  and a GEMM's summation order can follow its thread count, which leaves differences of ~1e-6).
* **memory**: rank 0's peak RSS (``ru_maxrss`` of the child, via ``os.wait4``) encoding 500 vs 5,000 small
  images in shards of 500, one rank: target within 10 %.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import Geometry
from benchmarks.pipeline import ROOT, TINY, make_checkpoint, make_jpegs, markdown, row, run_job

TINY_224 = Geometry("tiny-224", *TINY["p16"], 224)  # the stand-in these rows were first measured with


def pack_tars(images: list[Path], folder: Path, per_shard: int) -> list[Path]:
    """img2dataset's layout: ``{shard:05d}.tar`` holding ``KEY.jpg``, ``KEY.json``, ``KEY.txt`` per image."""
    folder.mkdir(parents=True, exist_ok=True)
    tars = []
    for shard, first in enumerate(range(0, len(images), per_shard)):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, image in enumerate(images[first : first + per_shard]):
                key = f"{shard:05d}{i:04d}"
                for name, data in ((f"{key}.jpg", image.read_bytes()), (f"{key}.json", json.dumps({"key": key}).encode()),
                                   (f"{key}.txt", f"image {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tars.append(path)
    return tars


def read_rows(folder: Path) -> dict[tuple[str, str], np.ndarray]:
    from tp_siglip import open_embeddings

    opened = open_embeddings(folder)
    table = opened.metadata(columns=["shard", "key"]).to_pydict()
    matrix = opened[0 : len(opened)]
    return {(s, k): matrix[i] for i, (s, k) in enumerate(zip(table["shard"], table["key"]))}


def groups_section(root: Path, shards: str, quick: bool) -> list[dict[str, Any]]:
    checkpoint = make_checkpoint(TINY_224, root / "ckpt")
    rows = []
    for workers in (["--workers", "0"], []):
        label = "--workers 0" if workers else "default --workers"
        one = run_job(Path(shards), checkpoint, 1, ["--batch-size", "32", *workers], root / f"one{len(workers)}")
        two = run_job(Path(shards), checkpoint, 2, ["--batch-size", "32", "--tp", "1", *workers], root / f"two{len(workers)}")
        a, b = read_rows(root / f"one{len(workers)}"), read_rows(root / f"two{len(workers)}")
        same_keys = sorted(a) == sorted(b)
        diff = max((float(np.abs(a[k] - b[k]).max()) for k in a), default=0.0) if same_keys else float("inf")
        match = "bit-identical" if diff == 0 else f"max abs diff {diff:.1e}"
        rows.append(row("groups", f"1 group of 1 rank, {label}", one["job_rate"], None, None, **one))
        rows.append(row("groups", f"2 groups of 1 rank (--tp 1), {label}; rows: same keys {same_keys}, {match}", two["job_rate"],
                        one["job_rate"], 1.7 if workers else None, same_keys=same_keys, max_abs_diff=diff, **two))
        if quick:
            break
    return rows


def peak_rss_mb(command: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {child.stderr.read().decode()[-2000:] if child.stderr else ''}")
    return usage.ru_maxrss / 1024


def memory_section(root: Path, sizes: list[int]) -> list[dict[str, Any]]:
    from PIL import Image

    checkpoint = make_checkpoint(TINY_224, root / "ckpt-memory")
    small = root / "small"
    small.mkdir()
    rng = np.random.default_rng(1)
    paths = []
    for i in range(max(sizes)):
        path = small / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    rows, first = [], None
    for size in sizes:
        tars = pack_tars(paths[:size], root / f"tars-{size}", 500)
        pattern = str(tars[0].parent / ("{00000.." + f"{len(tars) - 1:05d}" + "}.tar"))
        command = [sys.executable, "-m", "tp_siglip.encode", pattern, "--model", str(checkpoint),
                   "--output", str(root / f"mem-{size}"), "--batch-size", "32", "--workers", "1"]
        rss = peak_rss_mb(command)
        first = first or rss
        rows.append(row("memory", f"rank 0 peak RSS (MB), {size} rows in shards of 500", rss, first if size != sizes[0] else None,
                        None, within_10_percent=abs(rss / first - 1) <= 0.10))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="groups,memory")
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tp-siglip-corpus-") as tmp:
        root = Path(tmp)
        if "groups" in opts.only:
            per_shard = 20 if opts.quick else 200
            images = make_jpegs(root / "jpegs", 4 * per_shard)
            tars = pack_tars(images, root / "shards", per_shard)
            rows += groups_section(root, str(tars[0].parent / "{00000..00003}.tar"), opts.quick)
        if "memory" in opts.only:
            rows += memory_section(root, [50, 200] if opts.quick else [500, 5000])
    if opts.json is not None:
        opts.json.write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    for r in rows:
        if "within_10_percent" in r:
            print(f"- {r['run']}: within 10 % of the first: {'yes' if r['within_10_percent'] else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
