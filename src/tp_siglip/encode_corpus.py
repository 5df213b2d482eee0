"""``tp-siglip encode``'s run over shards, whichever the output: resume, commits, summary (docs/encode.md).

Inputs are shards (`sources`); the output is a folder of shards (`embeddings_dir`): the folder given, or
for a ``.safetensors`` output the hidden work folder ``.NAME.parts`` beside it, which rank 0 writes into
the one file once every shard is complete. A shard is the unit of commit and of ``--resume`` for both. A
folder output gives shard ``i`` to group ``i % groups``; a file's shards are dealt to the whole world.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from tp_siglip import __version__, console, embeddings_dir, processing, sources
from tp_siglip.embeddings_file import SAFETENSORS_MAX_HEADER, EarlierOutput, OutputFileError, work_folder, write_from_shards
from tp_siglip.hub import commit_of
from tp_siglip.lockstep import agree_on_checks, agree_on_shards, broadcast_from_rank0, collect_rows, gather_counts

__all__ = ["Corpus", "JobError", "Target", "UsageError", "check_corpus", "check_output_name", "run_shards"]

#: ``--output`` suffixes of files the job does not write: refused rather than made into a folder of that name
FILE_SUFFIXES = frozenset({".npy", ".npz", ".parquet", ".json", ".jsonl", ".pt", ".pth", ".bin", ".pkl", ".h5", ".hdf5",
                           ".csv", ".arrow", ".txt", ".tar", ".zip", *processing.IMAGE_SUFFIXES})
SIMILARITY_ROWS = 5


class UsageError(Exception):
    """A bad argument, found before any real work (exit status 2)."""


class JobError(Exception):
    """The job cannot go on (a ``--strict`` bad file, a failed rank, nothing readable): exit status 1."""


@dataclass(frozen=True)
class Target:
    """Where a run's shards go: ``root``, the output folder, or the work folder of the ``.safetensors`` ``file``."""

    root: Path
    file: Optional[Path] = None

    @classmethod
    def of(cls, output: Path) -> Target:
        """The target of ``--output``: a ``.safetensors`` name is a file, any other a folder."""
        file = output.suffix.lower() == ".safetensors"
        return cls(work_folder(output), output) if file else cls(output)


def check_output_name(output: Path) -> None:
    """Refuse an ``--output`` named like a file the job does not write (``emb.npy``: a folder by that name
    would surprise) with a :class:`UsageError` naming the two outputs there are."""
    suffix = output.suffix.lower()
    if suffix in FILE_SUFFIXES:
        raise UsageError(
            f"--output {output}: the job does not write {suffix} files; name a .safetensors file for one file "
            f"(--output {output.with_suffix('.safetensors')}) or a folder without a file suffix for shards "
            f"(--output {output.with_suffix('')}/: .npy embeddings + parquet metadata per shard)"
        )


@dataclass
class Corpus:
    """The run's inputs as shards and its output, as the checks found them: what folders left out, and (rank 0)
    the earlier run's manifest."""

    target: Target
    shards: list[sources.ShardSpec]
    ignored: Counter = field(default_factory=Counter)
    hidden: int = 0
    earlier: Optional[dict] = None
    #: rank 0: the earlier manifest is a finished ``.safetensors`` file's (its work folder is gone)
    finished: bool = False


def check_corpus(args: argparse.Namespace, rank: int, groups: int) -> Corpus:
    """The checks that need no model; raises :class:`UsageError` with a one-line message. Plain files are cut
    into at least ``groups`` shards, so that every group has work."""
    target = Target.of(args.output)
    if target.file is None:  # a folder output writes parquet metadata: refuse now, not after the model loaded
        try:
            sources.require_pyarrow()
        except ImportError as err:
            raise UsageError(f"--output {args.output} is a folder of shards: {err}") from None
    inputs = [str(p) for p in args.inputs]
    try:
        found = sources.find_shards(inputs, rows_per_file_shard=args.shard_size, min_file_shards=groups)
    except (OSError, ValueError, ImportError) as err:
        raise UsageError(str(err)) from None
    if not found.shards:
        left_out = f" (ignored by extension: {_counts(found.ignored)})" if found.ignored else ""
        if found.ignored.keys() & {".tar", ".parquet"}:
            left_out += "; a folder is searched for images only: name its shards (e.g. DIR/*.tar, or a quoted brace pattern 'DIR/{00000..00099}.tar')"
        raise UsageError(f"no images or shards found in {', '.join(inputs)}{left_out}")
    paths = sum(len(json.dumps(path)) + 1 for spec in found.shards for path in spec.files) if target.file else 0
    if paths > SAFETENSORS_MAX_HEADER:  # tar and parquet keys are known only later: write_from_shards checks again
        raise UsageError(f"--output {args.output}: the paths of {sum(len(s.files) for s in found.shards)} files take "
                         f"{paths:,} bytes, over the {SAFETENSORS_MAX_HEADER:,} of a safetensors header; write a folder "
                         f"of shards instead (--output {args.output.with_suffix('')}/)")
    corpus = Corpus(target, found.shards, found.ignored, found.hidden)
    if rank == 0:
        try:
            _check_writable(target, args.output)
            corpus.earlier, corpus.finished = _earlier_run(target, args.output, args.resume)
        except ValueError as err:
            raise UsageError(str(err)) from None
    return corpus


def _check_writable(target: Target, output: Path) -> None:
    if target.file is None and output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; a folder output needs a folder (or name a .safetensors file)")
    if target.file is not None and output.is_dir():
        raise ValueError(f"--output {output} is a folder; give a file name, e.g. --output {output / 'embeddings.safetensors'}")
    if target.file is not None and output.exists() and not output.is_file():
        raise ValueError(f"--output {output} exists and is not a regular file")
    parent = output.parent
    if not parent.exists():
        raise ValueError(f"--output {output}: the folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ValueError(f"--output {output}: {parent} is not a folder")
    try:  # a probe file: os.access says yes to root even where nothing can be created (/proc)
        descriptor, probe = tempfile.mkstemp(prefix=f".{output.name}.probe-", dir=output if output.is_dir() else parent)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"--output {output}: cannot write in {parent} ({err.strerror or err})") from None


def _earlier_run(target: Target, output: Path, resume: bool) -> tuple[Optional[dict], bool]:
    """Rank 0: the manifest of the run ``output`` holds (None: none), and whether it is a finished file's."""
    if (target.root / "manifest.json").exists():
        if not resume:
            holder = f"--output {output} already holds a run (manifest.json)"
            if target.file is not None:
                holder = f"the work folder {target.root} of --output {output} holds an interrupted run"
            raise ValueError(f"{holder}; pass --resume to continue it, or another --output")
        return embeddings_dir.read_manifest(target.root), False
    if target.file is None and output.is_dir() and any(not p.name.startswith(".") for p in output.iterdir()):
        raise ValueError(f"--output {output} holds other files (no manifest.json); name a new or empty folder")
    if target.file is None or not resume or not output.exists():
        return None, False
    try:
        manifest = json.loads(EarlierOutput.read(output).metadata.get("manifest", "null"))
    except (OutputFileError, json.JSONDecodeError) as err:
        raise ValueError(f"--resume: {err}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"--resume: {output} was written by an older tp-siglip (no manifest in it); use another --output")
    return manifest, True


def _counts(counter: Counter) -> str:
    return ", ".join(f"{name}: {count}" for name, count in sorted(counter.items()))


#: what a resumed run must share with the run that wrote the output: how to ask for the earlier run's value
_SAME_RUN: dict[str, Callable[[Any], str]] = {
    "model": lambda old: f"--model {old}",
    "revision": lambda old: f"--revision {old}",  # the Hub commit the weights came from (None: a local folder)
    "dtype": lambda old: f"--dtype {old}",
    "tokens": lambda old: "--tokens" if old else "no --tokens",
    "normalized": lambda old: "no --no-normalize" if old else "--no-normalize",
    "output_dtype": lambda old: f"--output-dtype {old}",
    "max_num_patches": lambda old: f"--max-num-patches {old}",
    "shard_size": lambda old: f"--shard-size {old}",
    **dict.fromkeys(("embedding", "hidden_size", "config"), lambda old: "the --model it was written with"),
}


def _other_run(earlier: dict, manifest: dict) -> Optional[str]:
    """What differs between the output's run (``earlier``, its manifest) and this one, with the fix; None: nothing."""
    for key, ask in _SAME_RUN.items():
        old, new = earlier.get(key), manifest[key]
        if old != new and not (key == "revision" and None in (old, new)):
            if key == "config" and isinstance(old, dict):
                fields = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
                old, new = (", ".join(f"{k} {config.get(k)}" for k in fields[:3]) for config in (old, new))
            return f"the output was written with {key} {old}, this run uses {new}: pass {ask(old)} or use another --output"
    there = [(s.get("name"), s.get("kind"), s.get("source"), s.get("files_sha1")) for s in earlier.get("shards", [])]
    here = [(s["name"], s["kind"], s["source"], s.get("files_sha1")) for s in manifest["shards"]]
    if not any(shard[3] for shard in there):  # written before shards recorded their files: compare without them
        here = [(*shard[:3], None) for shard in here]
    if there != here:
        first = next(i for i, (a, b) in enumerate(itertools.zip_longest(there, here)) if a != b)
        old, new = (" ".join(str(v) for v in s[first][:3] if v) if first < len(s) else "none" for s in (there, here))
        if old == new:
            old, new = f"{old} with other files", f"{new} with these"
        return (f"the inputs differ from the output's run ({len(there)} shard(s) there, {len(here)} now; shard {first} "
                f"is {old} there, {new} now): give the inputs it was written with or use another --output")
    return None


def _same_shards_but_files(earlier: dict, manifest: dict) -> bool:
    """Whether the two runs' shards differ only in their plain-file shards (the files, or the number of groups)."""
    shards = [[(s.get("name"), s.get("source")) for s in m.get("shards", []) if s.get("kind") != "files"] for m in (earlier, manifest)]
    return shards[0] == shards[1]


def _resume_decision(corpus: Corpus, manifest: dict) -> tuple[Optional[str], list[int]]:
    """Rank 0: ``(why this run cannot continue the output, or None; the shards already complete)``. Writes the
    manifest of a fresh run before any shard writer needs it; leftovers of killed writers go."""
    root, earlier = corpus.target.root, corpus.earlier
    if earlier is None:
        if corpus.target.file is not None:
            shutil.rmtree(root, ignore_errors=True)
        root.mkdir(exist_ok=True)
        embeddings_dir.write_manifest(root, manifest)
        return None, []
    problem = _other_run(earlier, manifest)
    if problem is not None and corpus.target.file is None and _same_shards_but_files(earlier, manifest):
        problem += ("; plain files are cut into at least one shard per group, so a resume also needs as many groups "
                    "(ranks / --tp) as the run that wrote it")
    if problem is not None:
        return f"--resume: {corpus.target.file or root}: {problem}", []
    if corpus.finished:
        return None, [shard["index"] for shard in manifest["shards"]]
    embeddings_dir.remove_incomplete(root)
    return None, sorted(embeddings_dir.completed_shards(root))


def run_shards(
    job: Any, args: argparse.Namespace, corpus: Corpus, group_index: int, groups: int, say: Any, group_say: Any
) -> None:
    """Every rank: encode this group's shards (see the module doc); ``say`` prints on global rank 0, ``group_say``
    on the group's rank 0 (the writer)."""
    world_rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    agree_on_shards([(s.name, s.kind, s.source, s.files) for s in corpus.shards])
    manifest = embeddings_dir.make_manifest(
        corpus.shards, model=str(args.model), dtype=job.dtype_name, embedding=job.embedding,
        hidden_size=job.model.config.hidden_size, config=job.model.config.to_dict(), tokens=bool(args.tokens),
        normalized=bool(args.normalize), output_dtype=args.output_dtype, max_num_patches=job.max_num_patches,
        shard_size=args.shard_size, revision=commit_of(job.model.checkpoint_dir),
    )
    problem, done = broadcast_from_rank0(_resume_decision(corpus, manifest) if world_rank == 0 else None)
    if problem is not None:
        raise UsageError(problem)
    if corpus.target.file is None and groups > 1:  # each group's rank 0 writes its shards in the folder rank 0 made
        _check_shared(corpus.target.root, world_rank, job.dealing.rank == 0)
    complete = set(done)
    mine = [s for s in corpus.shards if s.index % groups == group_index and s.index not in complete]
    naflex = f", NaFlex max_num_patches {job.max_num_patches} (from {job.checked.patches_from})" if job.naflex else ""
    say(f"{args.model}: {len(corpus.shards)} shard(s) ({len(done)} already complete), {_world_size() // job.dealing.tp} "
        f"group(s) of {job.dealing.tp} rank(s), {job.dtype_name}{naflex}; writing {args.output}")
    if not job.model.use_head:
        patches = "each image's valid patches" if job.naflex else "patches"
        say(f"this tower has no pooling head: storing the mean of last_hidden_state over {patches} as mean_pooled")
    start, encoded = time.perf_counter(), 0
    for number, spec in enumerate(mine, 1):
        encoded += _encode_shard(job, args, corpus.target, spec, f"{number}/{len(mine)}", len(corpus.shards), group_say)
    seconds = time.perf_counter() - start
    _report_times(job, seconds, group_say)
    counts = gather_counts(encoded if job.dealing.rank == 0 else 0, dist.group.WORLD if _world_size() > 1 else None)
    if world_rank == 0:
        _finish(corpus, manifest, job, sum(counts), seconds, say)


def _check_shared(root: Path, world_rank: int, writer: bool) -> None:
    """Every rank: raise UsageError unless every group's writer sees the output folder global rank 0 made, by a
    probe file rank 0 leaves there (``--output`` on a node's own disk would hold a part of the shards)."""
    probe = None
    if world_rank == 0:
        descriptor, path = tempfile.mkstemp(prefix=".shared-probe-", dir=root)
        os.close(descriptor)
        probe = Path(path).name
    probe = broadcast_from_rank0(probe)
    failure = None
    if writer and not (root / probe).is_file():
        failure = (f"--output {root} on this node is not the folder rank 0 writes (its file {probe} is not there); "
                   "give every node the same --output, on a file system they share")
    elsewhere = agree_on_checks(failure)
    if world_rank == 0:
        (root / probe).unlink()
    if failure is not None or elsewhere is not None:
        raise UsageError(failure or elsewhere)


def _report_times(job: Any, seconds: float, say: Any) -> None:
    """Where ``job``'s time went, and how many images each rank of its dealing decoded (one small collective)."""
    times = job.times
    decoded = "/".join(str(n) for n in gather_counts(int(times["decoded"]), job.dealing.group))
    how = f"{job.workers} decode worker(s) per rank" if job.workers else "decoding in the main process"
    say(
        f"time: {times['wait']:.2f} s waiting for decoded images, {times['exchange']:.2f} s exchanging, "
        f"{times['model']:.2f} s in the model, {times['write']:.2f} s writing, of {seconds:.2f} s; "
        f"{how}; images decoded per rank: {decoded} ({times['decode']:.2f} s of decoding on rank 0)"
    )


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _encode_shard(
    job: Any, args: argparse.Namespace, target: Target, spec: sources.ShardSpec, progress: str, shard_count: int, say: Any
) -> int:
    """Encode one shard with the job's batch loop; the writer commits it. Returns the rows encoded."""
    rows = sources.list_rows(spec)
    sink = ShardSink(target.root, spec, job.embedding, shard_count, target.file is None, say) if job.dealing.rank == 0 else None
    start, failure = time.perf_counter(), None
    try:
        encoded = job.encode(rows, sink, opener=open_row)
        if sink is not None:
            try:
                sink.writer.commit(sink.skipped, time.perf_counter() - start)
            except OSError as err:  # the writer has dropped the shard's spool; the other ranks learn of it below
                failure = f"cannot commit {sources.describe(spec)}: {type(err).__name__}: {err}"
    except BaseException:
        if sink is not None:
            sink.writer.abort()
        raise
    # every rank of the dealing learns whether the writer could commit: a failed commit stops them all at once,
    # instead of leaving them waiting in the next shard's first batch
    failures = collect_rows(None, {}, [0] * job.dealing.size, failure, job.dealing.group).failures
    failed = next((text for text in failures if text is not None), None)
    if failed is not None:
        raise JobError(failed)
    if sink is not None:
        seconds = time.perf_counter() - start
        say(f"{sources.describe(spec)}: {encoded} rows, {len(sink.skipped)} skipped, "
            f"{encoded / seconds if seconds > 0 else 0.0:.1f} img/s; shards done here: {progress}")
    return encoded


class ShardSink:
    """The `tp_siglip.encode.Sink` of one shard (on the writer rank): rows go to ``writer``, reasons to ``skipped``."""

    def __init__(self, root: Path, spec: sources.ShardSpec, embedding: str, shard_count: int, metadata: bool, say: Any) -> None:
        self.say, self.skipped = say, []
        self.writer = embeddings_dir.ShardWriter(
            root, spec.index, spec.name, embedding, source=spec.source, shard_count=shard_count, metadata=metadata
        )

    def add(self, rows: list[sources.Row], tensors: dict[str, torch.Tensor]) -> None:
        self.writer.add([row.key for row in rows], [dict(row.meta) for row in rows], tensors)

    def skip(self, row: sources.Row, reason: str) -> None:
        self.skipped.append([row.key, reason])
        self.say(f"skipped {row.key}: {reason}")


def open_row(row: sources.Row) -> Any:
    """A row's image, decoded like a file (`processing.load_image` / `load_image_data`); raises with its problem."""
    if row.ref is None:
        raise ValueError(row.problem or "no image for this key")
    if row.ref.kind == "file":
        return processing.open_file(row.ref.path)
    return processing.load_image_data(sources.read_bytes(row.ref))


def group_printer(printer: Any, group_index: int, groups: int) -> Callable[[str], None]:
    """What a group's rank 0 prints: results prefixed with the group when there are several."""
    prefix = f"[group {group_index}] " if groups > 1 else ""
    return lambda text: printer(prefix + text)


def _finish(corpus: Corpus, manifest: dict, job: Any, encoded: int, seconds: float, say: Any) -> None:
    """Global rank 0: write a ``.safetensors`` output from its complete work folder; the throughput, the
    similarities of the first images and the summary."""
    target, names = corpus.target, {s.index: s.name for s in corpus.shards}
    rate = f"{encoded} images in {seconds:.2f} s: {encoded / seconds if seconds > 0 else 0.0:.1f} images/s"
    if corpus.finished:
        earlier = EarlierOutput.read(target.file)
        say(f"{rate}; {target.file} is complete ({earlier.rows} rows)")
        _summary(corpus, [{"rows": earlier.rows, "skipped": json.loads(earlier.metadata.get("skipped", "[]"))}], encoded, say)
        return
    complete = embeddings_dir.completed_shards(target.root)
    stats = [{**complete[i], "name": names[i]} for i in sorted(complete)]
    rows = sum(int(entry["rows"]) for entry in stats)
    where = f"{target.root}: {len(complete)}/{len(corpus.shards)} shards complete, {rows} rows"
    done = len(complete) == len(corpus.shards)
    if done and not rows:  # both outputs: exit 1; a folder keeps the stats files that say why
        if target.file is not None:
            shutil.rmtree(target.root, ignore_errors=True)
        where = f"nothing written to {target.file}" if target.file else f"{target.root} holds 0 rows (see its stats files)"
        raise JobError(f"no readable image among the inputs; {where}")
    finished = done and target.file is not None  # the file is written once every shard is
    if finished:
        write_from_shards(target.file, target.root, stats, job.embedding, _file_metadata(job, manifest, stats))
        where = f"wrote {target.file} ({rows} rows)"
    say(f"{rate}; {where}")
    _similarities(target.root, stats, say)
    if finished:
        shutil.rmtree(target.root, ignore_errors=True)
    _summary(corpus, stats, encoded, say)


def _file_metadata(job: Any, manifest: dict, stats: list[dict]) -> dict[str, str]:
    metadata = {
        "format": "pt", "model": manifest["model"], "dtype": job.dtype_name, "world_size": str(_world_size()),
        "tp": str(job.dealing.tp), "embedding": job.embedding, "normalized": json.dumps(manifest["normalized"]),
        "output_dtype": manifest["output_dtype"], "tp_siglip_version": __version__,
        "paths": json.dumps([key for entry in stats for key in entry["keys"]]),
        "skipped": json.dumps([item for entry in stats for item in entry["skipped"]]), "complete": "true",
        "manifest": json.dumps(manifest),
    }
    if job.max_num_patches is not None:
        metadata["max_num_patches"] = str(job.max_num_patches)
    return metadata


def _similarities(root: Path, stats: list[dict], say: Any) -> None:
    """The cosine similarity of every pair of the first images (their keys' stems as names, shortened, or their
    row numbers), as a small table."""
    vectors: list[np.ndarray] = []
    names: list[str] = []
    for entry in (entry for entry in stats if entry["rows"]):
        rows = np.load(root / entry["files"][embeddings_dir.EMBEDDING_FOLDER], mmap_mode="r")[: SIMILARITY_ROWS - len(vectors)]
        keys = entry.get("keys") or [str(len(names) + i) for i in range(len(rows))]
        vectors += [np.array(row, dtype=np.float32) for row in rows]
        names += [Path(key).stem for key in keys[: len(rows)]]
        if len(vectors) == SIMILARITY_ROWS:
            break
    if not vectors:
        return
    unit = torch.nn.functional.normalize(torch.from_numpy(np.stack(vectors)), dim=-1)
    names = [n if len(n) <= 10 else n[:9] + "~" for n in names]
    say(f"cosine similarity of the first {len(names)} images")
    say(" " * 10 + "".join(f"{n:>11}" for n in names))
    for name, row in zip(names, (unit @ unit.T).tolist()):
        say(f"{name:<10}" + "".join(f"{v:>11.3f}" for v in row))


def _summary(corpus: Corpus, stats: list[dict], encoded: int, say: Any) -> None:
    reasons: Counter = Counter()
    for entry in stats:
        counted = Counter(reason for _, reason in entry.get("skipped", []))
        if counted and len(corpus.shards) > 1 and not corpus.finished:  # a finished file keeps its skips as one list
            say(f"skipped in shard {entry['name']}: " + "; ".join(f"{n} x {why}" for why, n in counted.most_common()))
        reasons.update(counted)
    ignored = sum(corpus.ignored.values())
    say(f"summary: {encoded} encoded, {sum(reasons.values())} skipped (unreadable or missing), {ignored} ignored by extension"
        + (f" ({_counts(corpus.ignored)})" if ignored else "") + f", {corpus.hidden} hidden file(s) ignored")
    missing = len(corpus.shards) - (len(corpus.shards) if corpus.finished else len(stats))
    if missing:
        console.write_line(f"{missing} shard(s) incomplete: run again with --resume", sys.stderr)
