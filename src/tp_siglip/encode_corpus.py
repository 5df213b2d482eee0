"""``tp-siglip encode --output DIR``: a corpus in shards, encoded by groups of ranks, one output shard per input shard.

    torchrun --nnodes 2 --nproc-per-node 8 ... -m tp_siglip.encode 'shards/{00000..00999}.tar' --output emb/ --tp 8

What is different from the one-file output of `tp_siglip.encode` (whose batch machinery this reuses):

* **Inputs are shards** (`tp_siglip.sources`): img2dataset webdataset tars and parquet files, one shard
  each; plain files, folders and ``.txt`` lists of paths are cut into shards of ``--shard-size`` rows. A
  row is ``(shard, key)`` (the path for plain files).
* **Groups**: ``--tp N`` cuts torchrun's world into groups of ``N`` consecutive ranks (`lockstep.form_groups`);
  each group loads the tower once (tensor parallel inside it when ``N`` > 1) and takes whole shards
  (plain files are cut into at least as many shards as there are groups): shard ``i`` goes to group ``i % groups``, so a rerun gives each group the same work. Pixels never
  cross groups; the group's rank 0 writes its shards.
* **Output** (`tp_siglip.embeddings_dir`): a folder that clip-retrieval / autofaiss users read as it is, a
  manifest, and per shard ``.npy`` embeddings + parquet metadata + a stats file written last.
* **Resume by shard**: ``--resume`` skips the shards whose stats file is there and agrees with the data,
  redoes the others from scratch, and refuses a folder written with another model, dtype or setup.
  Without ``--resume`` a folder that already holds a run is refused.
* **Progress**: each group's rank 0 prints one line per finished shard; global rank 0 prints the
  throughput line (every group's images over the wall time, load excluded) and the summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from tp_siglip import console, embeddings_dir, processing, sources
from tp_siglip.lockstep import broadcast_from_rank0, gather_shares

__all__ = ["CorpusInputs", "ShardOutput", "check_corpus_arguments", "is_folder_output", "run_corpus_job"]

logger = logging.getLogger(__name__)


#: ``--output`` suffixes of files the job does not write: refused rather than made into a folder of that name
FILE_SUFFIXES = frozenset({".npy", ".npz", ".parquet", ".json", ".jsonl", ".pt", ".pth", ".bin", ".pkl", ".h5", ".hdf5",
                           ".csv", ".arrow", ".txt", ".tar", ".zip", *processing.IMAGE_SUFFIXES})


def is_folder_output(output: Path) -> bool:
    """A ``--output`` that does not name a ``.safetensors`` file is a folder of shards."""
    return output.suffix.lower() != ".safetensors"


def check_output_name(output: Path) -> None:
    """Refuse an ``--output`` named like a file the job does not write (``emb.npy``: a folder by that name
    would surprise); :class:`ValueError` naming the two outputs there are."""
    suffix = output.suffix.lower()
    if suffix in FILE_SUFFIXES:
        raise ValueError(
            f"--output {output}: the job does not write {suffix} files; name a .safetensors file for one file "
            f"(--output {output.with_suffix('.safetensors')}) or a folder without a file suffix for shards "
            f"(--output {output.with_suffix('')}/: .npy embeddings + parquet metadata per shard)"
        )


@dataclass
class CorpusInputs:
    """What the checks found: the shards, what folders left out, and whether rank 0 found an earlier run."""

    shards: list[sources.ShardSpec]
    ignored: Counter = field(default_factory=Counter)
    hidden: int = 0
    earlier: Optional[dict] = None  # rank 0: the earlier run's manifest (--resume)


def check_corpus_arguments(args: argparse.Namespace, rank: int, groups: int, usage_error: type[Exception]) -> CorpusInputs:
    """The checks of a folder output that need no model; raises ``usage_error`` with a one-line message. Plain
    files are cut into at least ``groups`` shards, so that every group has work."""
    inputs = [str(p) for p in (args.inputs or [])]
    try:
        shard_plan = sources.plan_shards(inputs, rows_per_file_shard=args.shard_size, min_file_shards=groups)
    except (OSError, ValueError, ImportError) as err:
        raise usage_error(str(err)) from None
    if not shard_plan.shards:
        raise usage_error(f"no images or shards found in {', '.join(inputs)}")
    checked = CorpusInputs(shard_plan.shards, shard_plan.ignored, shard_plan.hidden)
    if rank == 0:
        checked.earlier = _check_output_folder(args.output, args.resume, usage_error)
    return checked


def _check_output_folder(output: Path, resume: bool, usage_error: type[Exception]) -> Optional[dict]:
    if output.exists() and not output.is_dir():
        raise usage_error(f"--output {output} is a file; a folder output needs a folder (or name a .safetensors file)")
    parent = output.parent
    if not parent.is_dir():
        raise usage_error(f"--output {output}: the folder {parent} does not exist; create it first")
    if not os.access(output if output.exists() else parent, os.W_OK):
        raise usage_error(f"--output {output}: cannot write there")
    if not (output / "manifest.json").exists():
        return None
    if not resume:
        raise usage_error(f"--output {output} already holds a run (manifest.json); pass --resume to continue it, or another --output")
    try:
        return embeddings_dir.read_manifest(output)
    except ValueError as err:
        raise usage_error(f"--resume: {err}") from None


class ShardOutput:
    """The `tp_siglip.encode.Sink` of one shard being written (the group's rank 0)."""

    def __init__(self, root: Path, spec: sources.ShardSpec, embedding: str, shard_count: int, say: Any) -> None:
        self.spec, self.say = spec, say
        self.writer = embeddings_dir.ShardWriter(root, spec.index, spec.name, embedding, source=spec.source, shard_count=shard_count)
        self.skipped: list[list[str]] = []
        self.rows = 0

    def add(self, rows: list[sources.Row], tensors: dict[str, torch.Tensor]) -> None:
        self.writer.add([row.key for row in rows], [dict(row.meta) for row in rows], tensors)
        self.rows += len(rows)

    def skip(self, row: sources.Row, reason: str) -> None:
        self.skipped.append([row.key, reason])
        self.say(f"skipped {row.key}: {reason}")

    def checkpoint_if_due(self) -> None:
        """Shards are the unit of resumption: nothing to save mid-shard."""

    def commit(self, seconds: float) -> dict:
        return self.writer.commit([(key, reason) for key, reason in self.skipped], seconds)

    def abort(self) -> None:
        self.writer.abort()


def open_row(row: sources.Row) -> Any:
    """A row's image, decoded like a file (`processing.load_image` / `load_image_data`); raises with its problem."""
    if row.ref is None:
        raise ValueError(row.problem or "no image for this key")
    if row.ref.kind == "file":
        path = Path(row.ref.path)
        if path.is_file() and path.stat().st_size == 0:
            raise ValueError("empty file (0 bytes)")
        return processing.load_image(path)
    return processing.load_image_data(sources.read_bytes(row.ref))


class GroupSay:
    """What a group's rank 0 prints: results prefixed with the group when there are several (one line per
    finished shard instead of a progress bar)."""

    def __init__(self, printer: Any, group_index: int, groups: int) -> None:
        self.printer, self.prefix = printer, (f"[group {group_index}] " if groups > 1 else "")

    def __call__(self, text: str) -> None:
        self.printer(self.prefix + text)


def manifest_for(job: Any, args: argparse.Namespace, checked: CorpusInputs) -> dict:
    """The manifest of this run: what the rows are (model, dtype, embedding, tower, setup) and the planned shards."""
    return embeddings_dir.make_manifest(
        checked.shards,
        model=str(args.model),
        dtype=job.dtype_name,
        embedding=job.embedding,
        hidden_size=job.model.config.hidden_size,
        config=job.model.config.to_dict(),
        tokens=bool(args.tokens),
        normalized=bool(args.normalize),
        output_dtype=args.output_dtype,
        max_num_patches=job.max_num_patches,
        shard_size=args.shard_size,
    )


def _resume_decision(root: Path, earlier: Optional[dict], manifest: dict) -> tuple[Optional[str], list[int]]:
    """Rank 0: ``(why this run cannot continue the folder, or None; the shards already complete)``.

    Writes the manifest (a fresh run) before any shard writer needs it; leftovers of killed writers go.
    """
    if earlier is not None:
        problem = embeddings_dir.check_same_run(earlier, manifest)
        flags = (("tokens", "--tokens"), ("normalized", "--no-normalize"), ("output_dtype", "--output-dtype"),
                 ("max_num_patches", "--max-num-patches"), ("shard_size", "--shard-size"))
        for key, flag in flags:
            if problem is None and earlier.get(key) != manifest[key]:
                problem = f"{flag}: the output folder was written with {key} {earlier.get(key)!r}, this run has {manifest[key]!r}"
        if problem is not None:
            return f"--resume: {root}: {problem}", []
        embeddings_dir.remove_incomplete(root)
        return None, sorted(embeddings_dir.completed_shards(root))
    root.mkdir(exist_ok=True)
    embeddings_dir.write_manifest(root, manifest)
    return None, []


def run_corpus_job(
    job: Any, args: argparse.Namespace, checked: CorpusInputs, group_index: int, groups: int, say: Any, group_say: GroupSay,
    usage_error: type[Exception],
) -> None:
    """Every rank: encode this group's shards (see the module doc); ``say`` prints on global rank 0, ``group_say``
    on the group's rank 0."""
    world_rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    decision = _resume_decision(args.output, checked.earlier, manifest_for(job, args, checked)) if world_rank == 0 else None
    problem, done = broadcast_from_rank0(decision)
    if problem is not None:
        raise usage_error(problem)
    mine = [s for s in checked.shards if s.index % groups == group_index and s.index not in set(done)]
    say(f"{args.model}: {len(checked.shards)} shards ({len(done)} already complete), {groups} group(s) of {job.dealing.size} rank(s), "
        f"{job.dtype_name}; writing {args.output}")
    start, encoded = time.perf_counter(), 0
    for number, spec in enumerate(mine, 1):
        encoded += _encode_shard(job, args, spec, f"{number}/{len(mine)}", len(checked.shards), group_say)
    seconds = time.perf_counter() - start
    world = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    ranks = dist.get_world_size() if world is not None else 1
    counts = gather_shares({"n": torch.tensor([encoded if job.dealing.rank == 0 else 0])}, {"n": ((), torch.int64)}, [1] * ranks, None, world)
    total = int(counts.rows("n").sum())
    if world_rank == 0:
        _summary(args.output, checked, total, seconds, say)


def _encode_shard(job: Any, args: argparse.Namespace, spec: sources.ShardSpec, progress: str, shard_count: int, say: GroupSay) -> int:
    """Encode one shard with the job's batch loop; the group's rank 0 commits it. Returns the rows encoded."""
    rows = sources.list_rows(spec)
    output = ShardOutput(args.output, spec, job.embedding, shard_count, say) if job.dealing.rank == 0 else None
    start = time.perf_counter()
    try:
        encoded, _ = job.encode(rows, output, opener=open_row, report=False)
        if output is not None:
            seconds = time.perf_counter() - start
            stats = output.commit(seconds)
            rate = encoded / seconds if seconds > 0 else 0.0
            say(f"shard {spec.name} ({sources.describe(spec)}): {encoded} rows, {len(output.skipped)} skipped, "
                    f"{rate:.1f} images/s; this group's shards done: {progress}")
            logger.info("shard %s committed: %s", spec.name, stats)
    except BaseException:
        if output is not None:
            output.abort()
        raise
    return encoded


def _summary(root: Path, checked: CorpusInputs, encoded: int, seconds: float, say: Any) -> None:
    complete = embeddings_dir.completed_shards(root)
    rate = encoded / seconds if seconds > 0 else 0.0
    rows = sum(int(stats.get("rows", 0)) for stats in complete.values())
    say(f"{encoded} images in {seconds:.2f} s: {rate:.1f} images/s; {root}: {len(complete)}/{len(checked.shards)} shards complete, {rows} rows")
    reasons: Counter = Counter()
    for index in sorted(complete):
        skipped = complete[index].get("skipped", [])
        if skipped:
            name = next(s.name for s in checked.shards if s.index == index)
            counted = Counter(reason for _, reason in skipped)
            say(f"skipped in shard {name}: " + "; ".join(f"{n} x {why}" for why, n in counted.most_common()))
            reasons.update(counted)
    say(f"summary: {encoded} encoded this run, {sum(reasons.values())} skipped (unreadable or missing) in the complete shards, "
        f"{sum(checked.ignored.values())} ignored by extension, {checked.hidden} hidden file(s) ignored")
    if len(complete) < len(checked.shards):
        console.write_line(f"{len(checked.shards) - len(complete)} shard(s) incomplete: run again with --resume", sys.stderr)
