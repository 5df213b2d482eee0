"""The one results table every section adds rows to, and how a row states a target.

A `Row` is a line of the markdown table (strings, formatted by the section) plus ``data``, the raw
numbers behind it, which only the ``--json`` output carries. Ratios are always "ours / reference", so
above 1 means ours is faster (or bigger, for memory rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Row:
    section: str
    geometry: str
    dtype: str
    batch: str
    setup: str
    ours: str
    reference: str
    ratio: str
    gflops: str = ""
    max_diff: str = ""
    target: str = ""
    met: str = ""
    data: dict[str, Any] = field(default_factory=dict)


COLUMNS = [
    ("section", "section"),
    ("geometry", "geometry"),
    ("dtype", "dtype"),
    ("batch", "batch"),
    ("setup", "measure / set-up"),
    ("ours", "ours"),
    ("reference", "reference"),
    ("ratio", "ours / ref"),
    ("gflops", "GFLOP/s ours / ref (of mm ceiling)"),
    ("max_diff", "max abs diff"),
    ("target", "target"),
    ("met", "met?"),
]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [str(getattr(row, key)).replace("|", "/") or "" for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(ok: Optional[bool]) -> str:
    return "" if ok is None else ("yes" if ok else "NO")


def at_least(value: float, bound: float) -> tuple[str, str]:
    """The target and met? cells for "value >= bound"."""
    return f">= {bound:.2f}x", verdict(value >= bound)


def at_most(value: float, bound: float) -> tuple[str, str]:
    """The target and met? cells for "value <= bound"."""
    return f"<= {bound:.2f}x", verdict(value <= bound)


def gflops_text(ours: float, ref: Optional[float], ceiling: Optional[float]) -> str:
    """``"ours (share) / ref (share) of ceiling"``; without a ceiling just the two rates."""
    if ceiling is None:
        return f"{ours:.0f}" + (f" / {ref:.0f}" if ref is not None else "")
    text = f"{ours:.0f} ({ours / ceiling:.0%})"
    if ref is not None:
        text += f" / {ref:.0f} ({ref / ceiling:.0%})"
    return text + f" of {ceiling:.0f}"
