"""Agreement between the ranks of a group: one rank's failure, or inputs that differ, raise on every rank.

Both exchanges ride on the group's CPU side group (`groups.side_group`) as fixed-size rows of bytes (no
pickling), never on the device group: on NCCL, reading them back would wait for all queued GPU work and
rule out CUDA graphs.

* `agree_on_failure` (loading): every rank raises when any rank failed, naming it and why.
* `agree_on_inputs` (every forward, ``check_inputs_agree``): "shapes" (default) compares shapes, dtypes
  and flags, read from tensor metadata only; "checksum" also compares a checksum of the bytes (a device
  sync, opt-in); "off" compares nothing, for servers that guarantee equal inputs themselves.
* A rank re-raises its own error from a frame that no longer holds it in a local, so no reference cycle
  (error -> traceback -> frame -> error) keeps the process group alive into interpreter exit.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, Optional

import torch

from tp_siglip.parallel.exchange import STATUS_WIDTH, exchange_status
from tp_siglip.parallel.groups import ProcessGroup, group_rank, group_size


def agree_on_failure(error: Optional[BaseException], group: Optional[ProcessGroup]) -> None:
    """Collective check-point: raise on every rank if ``error`` is set on any rank.

    Each rank contributes a status code and up to 1 KiB of its error message (UTF-8 bytes in a tensor; no
    pickling) on the group's CPU side group. A rank with its own error re-raises it; a healthy rank raises ``RuntimeError`` naming the rank that failed and
    why. Without a group it simply re-raises ``error``.
    """
    try:
        if group is None or group_size(group) == 1:
            if error is not None:
                raise error
            return
        message = "" if error is None else f"{type(error).__name__}: {error}"
        rows = exchange_status(group, error is not None, message)
        if error is not None:
            raise error
        failed = [r for r, (status, _) in enumerate(rows) if status]
        if failed:
            reasons = "; ".join(f"rank {r}: {rows[r][1]}" for r in failed)
            raise RuntimeError(
                f"loading failed on rank(s) {failed} of {len(rows)} (this is rank {group_rank(group)}): {reasons}"
            )
    finally:
        error = None  # the raised error's traceback holds this frame: a kept local would form a cycle


# ----------------------------------------------------------------------------- input agreement

#: ``check_inputs_agree`` values: compare shapes, dtypes and flags (default; reads no tensor data); also
#: compare a checksum of every tensor's bytes (reads them: one device sync); compare nothing (no collective)
AGREEMENT_MODES = ("shapes", "checksum", "off")
_FIELD_SEPARATOR, _VALUE_SEPARATOR = "\n", "\t"


def agree_on_inputs(
    group: Optional[ProcessGroup], check: Callable[[], Mapping[str, Any]], *, mode: str = "shapes", rows_split: bool = False
) -> dict[str, Any]:
    """Run one forward's local input ``check`` and make sure every rank of ``group`` got the same inputs.

    ``check()`` validates this rank's inputs (raising ``TypeError``/``ValueError`` as usual) and returns
    them by name, normalised (``output_hidden_states=None`` -> ``False``). Its error is not raised at once:
    one fixed-size all-gather (`exchange_status`) gives every rank every rank's verdict and an inputs signature
    (each tensor's shape and dtype, every other value's ``repr``; with ``mode="checksum"`` also a checksum
    of each tensor's bytes, see `tensor_checksum`). Then, if any rank failed its check, that rank raises its
    own error and every other rank a ``ValueError`` naming it; if the signatures differ, every rank raises
    a ``ValueError`` naming what differs on which ranks. Returns ``check()``'s inputs.

    Without a group, with a group of one, with ``mode="off"`` or inside ``torch.compile`` it only runs
    ``check()`` (raising at once): a compiled graph cannot branch on what the other ranks sent. The mode
    must be the same on every rank. ``rows_split``: each rank passes
    its own rows of a batch (`split_batch`), so tensors' first dimensions and checksums are not compared.
    """
    if torch.compiler.is_compiling() or group is None or group_size(group) == 1 or mode == "off":
        _check_mode(mode)
        return dict(check())
    inputs: dict[str, Any] = {}
    error: Optional[BaseException] = None
    text = ""
    try:
        _check_mode(mode)
        inputs = dict(check())
        text = input_signature(inputs, checksum=mode == "checksum" and not rows_split, rows_split=rows_split)
    except Exception as err:  # shared with every rank below, then raised here
        error = err
        text = f"{type(err).__name__}: {err}"
    try:
        verdict = _input_verdict(exchange_status(group, error is not None, text), group)
        if error is not None:
            raise error
        if verdict:
            raise ValueError(verdict)
    finally:
        error = None  # the raised error's traceback holds this frame: a kept local would form a cycle
    return inputs


def _check_mode(mode: object) -> None:
    if mode not in AGREEMENT_MODES:
        raise ValueError(f"check_inputs_agree {mode!r} is not one of {list(AGREEMENT_MODES)}")


def input_signature(inputs: Mapping[str, Any], *, checksum: bool = False, rows_split: bool = False) -> str:
    """What ranks compare: one ``field<TAB>value`` line per field of ``inputs``.

    A tensor ``x`` gives fields ``x shape`` and ``x dtype`` (and with ``checksum`` ``x checksum``, its
    `tensor_checksum`), anything else its ``repr``; with ``rows_split`` a tensor's first dimension reads
    ``rows``. Text too long for a status row keeps its first whole
    fields and ends with a ``signature digest`` field computed over all of them.
    """
    fields = []
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            shape = ("rows", *value.shape[1:]) if rows_split and value.dim() else tuple(value.shape)
            fields.append((f"{name} shape", str(shape)))
            fields.append((f"{name} dtype", str(value.dtype)))
            if checksum:
                fields.append((f"{name} checksum", str(tensor_checksum(value))))
        else:
            fields.append((name, repr(value)))
    lines = [f"{k}{_VALUE_SEPARATOR}{v}".replace(_FIELD_SEPARATOR, " ") for k, v in fields]
    text = _FIELD_SEPARATOR.join(lines)
    if len(text.encode()) <= STATUS_WIDTH - 1:
        return text
    # too long for a row: keep the first whole fields, and a digest that sees all of them
    digest = f"signature digest{_VALUE_SEPARATOR}{hashlib.blake2b(text.encode(), digest_size=16).hexdigest()}"
    kept, used = [], len(digest) + 1
    for line in lines:
        used += len(line.encode()) + 1
        if used > STATUS_WIDTH - 1:
            break
        kept.append(line)
    return _FIELD_SEPARATOR.join([*kept, digest])


def tensor_checksum(x: torch.Tensor) -> int:
    """An exact checksum of ``x``'s bytes that also sees the order of its rows (images).

    Each row ``x[i]`` is read as 32-bit integers (bytes when its size is not a multiple of 4) and summed
    modulo 2**32 (a wrapping sum: vectorised, about as fast as ``x.sum()``); the row sums are weighted by
    ``i + 1``. Integer sums do not depend on the order of summation, so equal tensors give equal
    checksums on any device and thread count. Any single changed element, or two swapped images, changes
    it; a reordering of values inside one image does not. Reads the whole tensor (one device sync).
    """
    if x.numel() == 0:
        return 0
    rows = x.detach().contiguous().reshape(x.shape[0] if x.dim() else 1, -1).view(torch.uint8)
    if rows.shape[1] % 4 == 0:
        sums = rows.view(torch.int32).sum(dim=1, dtype=torch.int32)  # wraps around: exact modulo 2**32
    else:
        sums = rows.sum(dim=1, dtype=torch.int64)
    return sum((i + 1) * (int(s) % 2**32) for i, s in enumerate(sums.tolist())) % 2**64


def _input_verdict(rows: list[tuple[bool, str]], group: ProcessGroup) -> str:
    """The error message for this rank given every rank's ``(failed, text)``; ``""`` when all agree."""
    size, rank = len(rows), group_rank(group)
    where = f"(this is rank {rank} of {size}); every rank must pass the same, valid inputs"
    failed = [r for r, (bad, _) in enumerate(rows) if bad]
    if failed:
        reasons = "; ".join(f"rank {r}: {rows[r][1]}" for r in failed)
        return f"the input check failed on rank(s) {failed} {where}: {reasons}"
    if all(text == rows[0][1] for _, text in rows):
        return ""
    tables = [dict((*f.split(_VALUE_SEPARATOR, 1), "")[:2] for f in text.split(_FIELD_SEPARATOR)) for _, text in rows]
    names = list(dict.fromkeys(name for table in tables for name in table))
    problems = []
    for name in names:
        values = [table.get(name, "<not given>") for table in tables]
        if len(set(values)) > 1:
            by_value: dict[str, list[int]] = {}
            for r, value in enumerate(values):
                by_value.setdefault(value, []).append(r)
            ranks = ", ".join(
                f"{'rank' if len(rs) == 1 else 'ranks'} {rs[0] if len(rs) == 1 else rs} {value}"
                for value, rs in by_value.items()
            )
            problems.append(f"{name} differs across ranks: {ranks}")
    return f"{'; '.join(problems)} {where}"


