"""The main job's command line: images or shards in, one ``.safetensors`` file or a folder of shards out.

    tp-siglip encode [INPUTS...] [--model M] [--output F]            # one process
    torchrun --nproc-per-node 2 -m tp_siglip.encode [INPUTS...] ...  # 2 ranks (data parallel; --tp 2: one tensor group)

This module holds what every run does alike: the arguments (checked before the model loads by
`encode_checks`: a bad one prints one line and exits 2), the model load, and the batch loop (`Job`: decode -> forward ->
collect -> a `Sink`). The run over shards is `encode_corpus`'s. The user's guide is docs/encode.md; how
the parts fit, docs/encode-design.md. Exit status: 0 done, 1 failed while running, 2 bad arguments, 130
interrupted (the committed shards are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

from tp_siglip import encode_corpus, hardware, hub, pipeline, processing, processing_naflex
from tp_siglip.console import Printer, setup_logging
from tp_siglip.encode_checks import (
    DEFAULT_IMAGES,
    DEFAULT_MAX_NUM_PATCHES,
    DEFAULT_MODEL,
    PREPROCESSOR_CONFIG,
    Checked,
    check_arguments,
    checkpoint_max_num_patches,
    not_naflex,
)
from tp_siglip.encode_corpus import JobError, UsageError
from tp_siglip.lockstep import (
    RanksDisagree,
    agree_on_checks,
    agree_on_max,
    agree_on_weights,
    broadcast_from_rank0,
    collect_rows,
    form_groups,
    gather_reasons,
)
from tp_siglip.parallel import backend_for, init_default_group

__all__ = ["DEFAULT_IMAGES", "DEFAULT_MAX_NUM_PATCHES", "DEFAULT_MODEL", "add_arguments", "build_parser", "main", "run"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: ``--output-dtype`` choices
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# ----------------------------------------------------------------------------- arguments


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default (help texts that already say ``default:`` are left alone)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    wanted = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        with contextlib.suppress(ValueError):
            if int(text) >= low:
                return int(text)
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _output_path(text: str) -> Path:
    """An argparse type for ``--output``: a path, except a ``.safetensors`` name ending in a slash (``Path`` would drop
    the slash, and the folder the user may have meant would silently be one file)."""
    if text.endswith(("/", os.sep)) and Path(text).suffix.lower() == ".safetensors":
        raise argparse.ArgumentTypeError(
            f"{text} ends in '{text[-1]}' like a folder but is named like a file: give {text.rstrip('/' + os.sep)} for "
            f"one .safetensors file, or a folder name without the .safetensors suffix for a folder of shards")
    return Path(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the encode job's arguments to ``parser`` (shared by ``tp-siglip encode`` and ``-m tp_siglip.encode``)."""
    add = parser.add_argument
    add("inputs", nargs="*", type=Path, metavar="INPUT",
        help="image files, folders (searched recursively), .txt lists of paths, webdataset .tar or parquet shards, brace "
             f"patterns like 'shards/{{00000..00099}}.tar' (default: the 5 bundled photos in {DEFAULT_IMAGES})")
    add("--model", default=DEFAULT_MODEL,
        help="Hub repo id (downloaded once, needs the network) or a local folder with config.json and *.safetensors")
    add("--revision", default=None,
        help="Hub revision of --model: a branch, tag or commit sha (default: main; the output records the commit)")
    add("--output", type=_output_path, default=Path("embeddings.safetensors"),
        help="a .safetensors file to write (atomically, at the end), or a folder of shards (any other name: .npy "
             "embeddings + parquet metadata per input shard, see docs/encode.md)")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype; auto = as stored. On a CPU without native bf16/fp16 half precision is ~7x slower: use float32")
    add("--batch-size", type=_positive_int, default=8, help="images per forward pass")
    add("--no-normalize", dest="normalize", action="store_false",
        help="store the tower's raw pooler_output / mean_pooled instead of the L2-normalised embedding (default: "
             "normalised, so an inner-product index ranks by cosine similarity)")
    add("--output-dtype", default="float32", choices=sorted(OUTPUT_DTYPES),
        help="dtype of the stored tensors; float16 halves the output (what clip-retrieval stores)")
    add("--tp", type=_positive_int, default=None, metavar="N",
        help="ranks per group, tensor parallel inside a group: torchrun's world is cut into groups of N consecutive ranks, "
             "each holding one copy of the tower (default: 1, data parallel, each rank its own group; more only on a GPU "
             "too small for the tower, see docs/encode.md)")
    add("--shard-size", type=_positive_int, default=10_000, metavar="ROWS",
        help="plain image files (and .txt lists) are cut into shards of this many rows: the unit of commit and --resume")
    add("--parallel", default=None, help=argparse.SUPPRESS)  # gone: refused with a message naming --tp
    add("--tokens", action="store_true",
        help="also store last_hidden_state (N, patches, hidden); spooled to disk. NaFlex towers: (N, max_num_patches, "
             "hidden) with padding rows zero, plus pixel_attention_mask (N, max_num_patches) and spatial_shapes (N, 2)")
    add("--max-num-patches", type=_positive_int, default=None, metavar="N",
        help="SigLIP2 NaFlex towers only: patches per image; each image gets the largest grid of at most N patches "
             f"that keeps its aspect ratio (default: max_num_patches of the checkpoint's {PREPROCESSOR_CONFIG}, else "
             f"{DEFAULT_MAX_NUM_PATCHES})")
    add("--device", default=None,
        help="cpu, cuda, cuda:1, ... (default: this rank's GPU, cuda:$LOCAL_RANK, when CUDA is available, else cpu)")
    add("--workers", type=_non_negative_int, default=None, metavar="N",
        help="decode worker processes per rank, decoding ahead of the model (default: this rank's part of the CPU "
             f"cores, 1 to {pipeline.MAX_DEFAULT_WORKERS}; 0: decode in the main process)")
    add("--strict", action="store_true", help="stop at the first unreadable file (exit 1) instead of skipping it")
    add("--resume", action="store_true",
        help="continue the run --output holds: keep its complete shards and encode the others (same --model, --dtype, "
             "--tokens, --shard-size and inputs)")
    add("--save-every", default=None, help=argparse.SUPPRESS)  # gone: refused with a message naming --shard-size


#: the job's ``--help`` text, the same for ``tp-siglip encode`` and ``-m tp_siglip.encode``
DESCRIPTION = ("Encode images, or img2dataset tar/parquet shards, with a (tensor-parallel) SigLIP vision tower\n"
               "into one .safetensors file or a folder of shards.")
EPILOG = "exit status: 0 done, 1 failed while running, 2 bad arguments, 130 interrupted (rerun with --resume to continue)"
#: how ``-m tp_siglip.encode`` is named in its usage and errors (argparse's default, ``sys.argv[0]``, is ``encode.py``)
PROG = "python -m tp_siglip.encode"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``-m tp_siglip.encode`` parser (``prog`` default: :data:`PROG`)."""
    parser = argparse.ArgumentParser(
        prog=prog or PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    add_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None) -> int:
    """Parse ``argv`` and run the job; returns the exit status (argparse itself exits 2 on bad options)."""
    return run(build_parser(prog).parse_args(argv))


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    """Run the job described by parsed ``args``; returns the exit status. Every rank calls this."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    setup_logging(rank, world_size)
    say = Printer(rank, world_size)
    try:
        try:
            checked, failure = check_arguments(args, rank, world_size), None
        except UsageError as err:
            failure = str(err)
        if world_size > 1 and not dist.is_initialized():
            init_default_group(_default_backend(args.device))  # --device cpu: gloo, even where there are GPUs
        elsewhere = agree_on_checks(failure)  # a check failed on one node only stops every node at once
        if failure is not None or elsewhere is not None:
            raise UsageError(failure or elsewhere)
        tp = agree_on_max(checked.tp)
        group, group_index, groups = form_groups(tp)
        model = _load_model(args, checked.device, tp, group)
        agree_on_weights(model, tp, args.model)
        tp_group = group if tp > 1 else None
        if checked.corpus.target.file is not None:  # one file: the world deals out each batch, rank 0 writes
            world = dist.group.WORLD if world_size > 1 else None
            dealing, group_index, groups = Dealing(rank, world_size, world, tp, tp_group), 0, 1
        else:  # a folder: each group deals out its own shards' batches, its rank 0 writes
            dealing = Dealing(rank % tp, tp, tp_group, tp, tp_group)
        job = Job(args, checked, model, dealing, say)
        with _sigterm_as_interrupt():
            job.start()
            writer_say = encode_corpus.group_printer(Printer(dealing.rank, world_size), group_index, groups)
            encode_corpus.run_shards(job, args, checked.corpus, group_index, groups, say, writer_say)
    except UsageError as err:
        say.error(str(err))
        return EXIT_USAGE
    except KeyboardInterrupt:
        say.error("interrupted; the committed shards are kept: run again with --resume to continue")
        return EXIT_INTERRUPTED
    except (JobError, RanksDisagree, OSError, ValueError, TypeError, RuntimeError, ImportError) as err:
        # Input errors happen alike on every rank, a failed load is reported on every rank by from_pretrained
        # and decisions about files are agreed collectively: no rank is left waiting for another.
        text = str(err) if isinstance(err, (JobError, RanksDisagree)) else f"{type(err).__name__}: {err}"
        say.error(" ".join(text.split()))
        return EXIT_FAILED
    return EXIT_OK


def _default_backend(device: Optional[str]) -> str:
    """The default group's backend for ``--device``: the same on every rank, whatever its own checks found."""
    try:
        return backend_for(device)
    except (RuntimeError, TypeError):  # not a device name: refused by the checks, on every rank
        return backend_for(None)


def _load_model(args: argparse.Namespace, device: Optional[str], world_size: int, group: Any = None) -> Any:
    from tp_siglip import SiglipVisionTransformer

    try:
        return SiglipVisionTransformer.from_pretrained(
            args.model, world_size=world_size, process_group=group, dtype=args.dtype, device=device, revision=args.revision
        )
    except Exception as err:
        text = " ".join(f"{type(err).__name__}: {err}".split()).rstrip(".")
        text = text if len(text) <= 1000 else text[:997] + "..."
        hint = ""
        # a repo id that could not be fetched (offline, unreachable, unknown, a broken transfer: all OSErrors) gets the
        # network fixes; a repo refused for its content (pickle-only, no tower: CheckpointError) would not load either way
        if not Path(args.model).exists() and isinstance(err, OSError):
            hint = (" To run without the network, pass --model <local folder> (config.json and *.safetensors, e.g. a "
                    "Hub snapshot copied from a machine with network access)")
            if not hub.offline_setting()[1]:  # HF_HUB_OFFLINE=0 is not offline; TRANSFORMERS_OFFLINE=1 is
                hint += "; to use a copy already in the Hugging Face cache, set HF_HUB_OFFLINE=1"
            hint += "."
        raise JobError(f"cannot load --model {args.model}: {text}.{hint}") from err


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (what torchrun and batch schedulers send) raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Sink(Protocol):
    """Where `Job.encode` puts each batch's results (on the dealing's rank 0): rows of the readable items and
    a reason for each skipped one. (What is already done, and committing, are the caller's: `encode_corpus`.)"""

    def add(self, items: list[Any], tensors: dict[str, torch.Tensor]) -> None: ...

    def skip(self, item: Any, reason: str) -> None: ...


class StoredRows:
    """What the job stores for each image: the model's inputs made from decoded uint8 rows, and the stored
    tensors made from the model's outputs."""

    def __init__(self, model: Any, args: argparse.Namespace, embedding: str, max_num_patches: Optional[int]) -> None:
        self.model, self.args, self.embedding, self.max_num_patches = model, args, embedding, max_num_patches
        self.naflex = max_num_patches is not None
        self._pixels: Optional[torch.Tensor] = None  # the CPU pixel buffer, see model_inputs
        self._host: Optional[torch.Tensor] = None  # the pinned host buffer, see on_host

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Row shapes and dtypes of what the output stores, as :meth:`stored` makes them."""
        config, hidden = self.model.config, self.model.config.hidden_size
        dtype = OUTPUT_DTYPES[self.args.output_dtype]
        specs = {self.embedding: ((hidden,), dtype)}
        if self.args.tokens:
            tokens = self.max_num_patches if self.naflex else (config.image_size // config.patch_size) ** 2
            specs["last_hidden_state"] = ((tokens, hidden), dtype)
            if self.naflex:
                specs["pixel_attention_mask"] = ((tokens,), dtype)
                specs["spatial_shapes"] = ((2,), dtype)
        return specs

    def model_inputs(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """uint8 rows -> the model's inputs in its dtype, normalised on its device (the 256-entry table's values).
        On the CPU the pixels go to a buffer kept from batch to batch: new pages each batch cost more than the
        normalisation itself (on a GPU the caching allocator already reuses memory)."""
        levels = rows["levels"].to(self.model.device, non_blocking=True)
        if self.naflex:
            return processing_naflex.naflex_inputs(levels, rows["spatial_shapes"].to(self.model.device), self.model.dtype)
        buffer = None
        if levels.device.type == "cpu":
            if self._pixels is None or len(self._pixels) < len(levels) or self._pixels.shape[1:] != levels.shape[1:]:
                self._pixels = torch.empty((max(len(levels), self.args.batch_size), *levels.shape[1:]), dtype=self.model.dtype)
            buffer = self._pixels[: len(levels)]
        preprocessing = self.model.config.preprocessing  # a timm / open_clip checkpoint's normalisation
        return {"pixel_values": processing.to_pixel_values(levels, self.model.dtype, out=buffer, preprocessing=preprocessing)}

    def stored(self, out: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the output stores for these images, float32 on the host, before the cast to ``--output-dtype``:
        the embedding (L2-normalised unless ``--no-normalize``) and, with ``--tokens``, the token rows."""
        tokens = out.last_hidden_state
        if self.naflex:
            mask = inputs["pixel_attention_mask"].to(tokens.device).bool()
            # padding rows zeroed: what a tower computes there differs between a tensor group and one rank, and means nothing
            tokens = tokens.float().masked_fill(~mask[..., None], 0.0)
        if self.model.use_head:
            vectors = out.pooler_output.float()
        else:
            vectors = tokens.sum(1) / mask.sum(1, keepdim=True) if self.naflex else tokens.mean(dim=1).float()
        tensors = {self.embedding: torch.nn.functional.normalize(vectors, dim=-1) if self.args.normalize else vectors}
        if self.args.tokens:
            tensors["last_hidden_state"] = tokens.float()
            if self.naflex:
                tensors["pixel_attention_mask"] = inputs["pixel_attention_mask"].float()
                tensors["spatial_shapes"] = inputs["spatial_shapes"].float()
        return self.on_host(tensors)

    def on_host(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (float32) on the host: from a GPU packed into one buffer, copied once per batch into pinned
        memory kept from batch to batch, with one wait (no tensor-by-tensor ``.cpu()``; nothing goes back to the
        device: the exchanges run on the CPU side group). CPU tensors are returned as they are."""
        if all(t.device.type == "cpu" for t in tensors.values()):
            return tensors
        device = next(t.device for t in tensors.values() if t.device.type != "cpu")
        flat = torch.cat([t.to(device).reshape(-1) for t in tensors.values()])
        if self._host is None or self._host.numel() < flat.numel():
            self._host = torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=device.type == "cuda")
        host = self._host[: flat.numel()]
        host.copy_(flat, non_blocking=True)
        if device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(device))  # the copy's stream: its GPU's, which need not be the current one
            done.synchronize()  # the one wait per batch: the rows are read on the host next
        views, offset = {}, 0
        for name, tensor in tensors.items():
            views[name] = host[offset : offset + tensor.numel()].view(tensor.shape)
            offset += tensor.numel()
        return views


@dataclass(frozen=True)
class Dealing:
    """Which ranks deal out each batch (``group``: ``size`` ranks, this one ``rank``; each decodes its part and
    the rows are gathered to the dealing's rank 0, the writer), and this rank's tensor-parallel group of ``tp``
    consecutive ranks among them that run a forward together (``tp_group``: None for ``tp`` 1)."""

    rank: int
    size: int
    group: Any
    tp: int
    tp_group: Any


class Job:
    """One run of the job on one rank, once the arguments are checked and the model is loaded."""

    def __init__(self, args: argparse.Namespace, checked: Checked, model: Any, dealing: Dealing, say: Printer) -> None:
        self.args, self.checked, self.model, self.dealing, self.say = args, checked, model, dealing, say
        self.embedding = "pooler_output" if model.use_head else "mean_pooled"
        self.dtype_name = str(model.dtype).removeprefix("torch.")
        self.naflex = model.config.variant == "naflex"
        if not self.naflex and args.max_num_patches is not None:
            raise not_naflex(args)
        self.max_num_patches: Optional[int] = None  # NaFlex: rank 0's value, agreed in start()
        self.workers = pipeline.default_workers() if args.workers is None else args.workers
        self.rows = StoredRows(model, args, self.embedding, None)  # NaFlex: remade in start() with the grid size
        self.times: Counter = Counter()  # seconds per step, over every encode() call
        model.check_finite = False  # the job's pixels come from uint8 levels through the table: finite by construction

    def start(self) -> None:
        """What every run does first: the emulated-half warning, every rank on rank 0's NaFlex grid size (an
        unusable one stops the run)."""
        if self.dealing.rank == 0:
            hardware.warn_if_emulated_half(self.model.device, self.model.dtype)
        if not self.naflex:
            return
        own, found = self.checked.max_num_patches, self.checked.patches_from
        if self.args.max_num_patches is None and self.model.checkpoint_dir is not None:  # the files actually loaded
            own, found = checkpoint_max_num_patches(str(self.model.checkpoint_dir))
        agreed = broadcast_from_rank0(own or 0)
        if agreed == 0:
            raise UsageError(found if own is None else "rank 0 has no usable max_num_patches (see its error)")
        if own is not None and own != agreed:
            logger.warning("max_num_patches: this rank found %d (from %s), rank 0 uses %d: using rank 0's", own, found, agreed)
        self.max_num_patches = agreed
        self.rows = StoredRows(self.model, self.args, self.embedding, agreed)

    def encode(self, items: list[Any], sink: Optional[Sink], opener: Any = None) -> int:
        """The batch loop: decode, forward, collect, and (the dealing's rank 0) hand each batch to ``sink``.

        ``items`` are file paths, or anything ``opener`` turns into an image (`processing.read_files`); every
        rank of the dealing passes the same. Returns the images encoded; each step's seconds add up in ``times``.
        """
        size = self.args.batch_size
        batches = [items[first : first + size] for first in range(0, len(items), size)]
        decoder = pipeline.PortionDecoder(batches, self.dealing.rank, self.dealing.size, self._decode_function(opener))
        # borrowed: a portion's levels are read once, within its batch (normalised) and let go
        portions = pipeline.decoded_portions(decoder, self.workers, pin_memory=self.model.device.type == "cuda", borrowed=True)
        encoded = 0
        threads = pipeline.MainThreads(self.model.device.type == "cpu" and self.workers > 0)
        bar = self.say.progress(len(items))
        try:
            with torch.inference_mode():
                for batch in batches:
                    decoding = self.times["decode"]
                    encoded += self._encode_batch(batch, portions, sink)
                    threads.update(self.times["decode"] - decoding)
                    bar.update(len(batch))
        finally:
            bar.close()
            self.say.bar = None
            portions.close()
            threads.restore()
        return encoded

    def _decode_function(self, opener: Any) -> Any:
        config = self.model.config
        if self.naflex:
            return functools.partial(
                pipeline.decode_naflex, patch_size=config.patch_size, max_num_patches=self.max_num_patches, opener=opener
            )
        library = {} if config.preprocessing is None else {"preprocessing": config.preprocessing}  # timm / open_clip
        return functools.partial(pipeline.decode_fixed, image_size=config.image_size, opener=opener, **library)

    def _encode_batch(self, batch: list[Any], portions: Iterator[pipeline.Decoded], sink: Optional[Sink]) -> int:
        """Take this rank's decoded portion, run and store one batch; returns how many images were encoded.

        A tensor group runs the batch split by rows (`parallel.split_batch`), each rank feeding the tower the
        images it decoded: first its ranks tell each other which of them they could read (and whether they have
        a portion at all), so that all know the row counts."""
        clock, portion, failure = time.perf_counter(), None, None
        try:
            portion = next(portions)
        except pipeline.DecodeFailed as err:
            failure = str(err)
        self.times["wait"] += time.perf_counter() - clock
        if portion is not None:
            self.times["decode"] += portion.seconds
            self.times["decoded"] += portion.count
        rank, size, tp = self.dealing.rank, self.dealing.size, self.dealing.tp
        sizes = [stop - begin for begin, stop in (pipeline.portion_bounds(len(batch), size, r) for r in range(size))]
        if tp == 1:
            return self._data_batch(batch, portion, failure, sizes, sink)
        clock = time.perf_counter()
        ok = None if portion is None else {"ok": _readable(portion).to(torch.uint8)}
        first = rank - rank % tp  # this tensor group's first rank among the dealt ranks
        flags = collect_rows(ok, {"ok": ((), torch.uint8)}, sizes[first : first + tp], failure, self.dealing.tp_group)
        failed = next((text for text in flags.failures if text is not None), None)
        if failed is not None and size > tp:
            # no forward; the other tensor groups learn of it at the gather of the batch's rows (no rank waits)
            return self._data_batch(batch, None, failure or f"a rank of this tensor group: {failed}", sizes, sink)
        _raise_failures(flags.failures, batch)
        self.times["exchange"] += time.perf_counter() - clock
        return self._data_batch(batch, portion, None, sizes, sink, [int(part.sum()) for part in flags.parts["ok"]])

    def _data_batch(
        self, batch: list[Any], portion: Optional[pipeline.Decoded], failure: Optional[str], sizes: list[int],
        sink: Optional[Sink], batch_sizes: Optional[list[int]] = None,
    ) -> int:
        """Every rank runs its own portion on its replica (with ``batch_sizes``, every rank's readable images:
        the tensor group's ranks run it together, each with its own rows, even with none); the group gathers
        the stored rows."""
        clock = time.perf_counter()
        specs = self.rows.specs()
        local = None
        if portion is not None:
            ok = _readable(portion)
            local = {name: torch.zeros(portion.count, *shape, dtype=dtype) for name, (shape, dtype) in specs.items()}
            local["ok"] = ok.to(torch.uint8)
            if bool(ok.any()) if batch_sizes is None else sum(batch_sizes) > 0:
                decoded = {"levels": portion.levels}
                if portion.spatial_shapes is not None:
                    decoded["spatial_shapes"] = portion.spatial_shapes
                inputs = self.rows.model_inputs(decoded if ok.all() else {name: tensor[ok] for name, tensor in decoded.items()})
                out = self.model(*inputs.values(), batch_sizes=batch_sizes)
                for name, tensor in self.rows.stored(out, inputs).items():
                    local[name][ok] = tensor.to(local[name].dtype)
        self.times["model"] += time.perf_counter() - clock
        clock = time.perf_counter()
        gathered = collect_rows(local, {**specs, "ok": ((), torch.uint8)}, sizes, failure, self.dealing.group)
        _raise_failures(gathered.failures, batch)
        keep = gathered.rows("ok").bool().cpu()
        chosen = keep.nonzero().flatten()
        # copied out before the group's next collective (the reasons' exchange, the next batch's)
        rows = {name: gathered.rows(name)[chosen].cpu() for name in specs} if sink is not None and len(chosen) else None
        self.times["exchange"] += time.perf_counter() - clock
        if not bool(keep.all()):  # why images are skipped: the rank that decoded an image decided; --strict stops
            why = gather_reasons(portion.reasons if portion is not None else [], self.dealing.group)
            for i in (~keep).nonzero().flatten().tolist():
                reason = why[i] or "unreadable"
                if self.args.strict:
                    raise JobError(f"--strict: cannot use {_label(batch[i])}: {reason}")
                if sink is not None:
                    sink.skip(batch[i], reason)
        if rows is not None:
            clock = time.perf_counter()
            sink.add([batch[i] for i in chosen.tolist()], rows)
            self.times["write"] += time.perf_counter() - clock
        return len(chosen)


def _raise_failures(failures: list[Optional[str]], batch: list[Any]) -> None:
    """Stop every rank when any rank of the dealing failed (each rank gets the same list)."""
    failed = [(rank, text) for rank, text in enumerate(failures) if text is not None]
    if failed:
        where = "; ".join(f"rank {rank}: {text}" for rank, text in failed)
        raise JobError(f"cannot go on: {where} (items {_label(batch[0])} .. {_label(batch[-1])})")


def _label(item: Any) -> str:
    """How a batch item is named in messages: a file's path, or a shard row's ``key``."""
    return str(getattr(item, "key", item))


def _readable(portion: pipeline.Decoded) -> torch.Tensor:
    """Which images of the portion the rank that decoded them could read (bool, one per image)."""
    return torch.tensor([reason is None for reason in portion.reasons], dtype=torch.bool)


if __name__ == "__main__":
    sys.exit(main())
