"""Measurement primitives every benchmark section shares.

* `Geometry`: a SigLIP vision tower's shape, its analytic forward FLOPs and parameter count.
* Timing: `timed` (device-synchronised wall clock), `matmul_ceiling` (what a plain GEMM reaches on this
  machine, the yardstick for the GFLOP/s column), `median`.
* Outputs: `outputs_of` (the tensors a forward returns, as fp32 on the CPU), `max_abs_diff`, `parity`
  (whether ours and transformers' outputs agree within the bounds stated there).
* `log`: progress lines on stderr, stamped with the seconds since the run started; the table itself
  goes to stdout.

Choices: inputs are fixed, seeded fp32 batches (what an image processor hands over); every checkpoint is
a local directory, so the command-line entry points switch the Hub off (`offline_hub`) for the run;
importing these modules changes no setting.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

try:  # a source checkout without `pip install -e .`
    import tp_siglip  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
START = time.perf_counter()


@dataclass(frozen=True)
class Geometry:
    """A SigLIP vision tower's shape (transformers' config names in `hf_config`)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    patch: int
    image: int
    channels: int = 3
    head: bool = True

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def label(self) -> str:
        """The name, with the layer count when it is not the public model's."""
        full = FULL_LAYERS.get(self.name)
        return self.name if full == self.layers else f"{self.name} ({self.layers}L)"

    def hf_config(self) -> dict[str, Any]:
        return dict(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            patch_size=self.patch,
            image_size=self.image,
            num_channels=self.channels,
            vision_use_head=self.head,
        )

    def flops_per_image(self) -> float:
        """Forward FLOPs for one image, counting a multiply-add as 2 FLOPs.

        With ``T = (image / patch)**2`` tokens, ``D`` hidden, ``F`` MLP width, ``L`` layers, ``C``
        channels and ``P`` patch size::

            patch conv   2*T*(C*P*P)*D
            each layer   2*T*(4*D*D + 2*D*F)          q, k, v, out projections; fc1, fc2
                       + 4*T*T*D                      Q K^T and softmax(.) V over all heads
            head         2*(D*D + 2*T*D*D + D*D + 2*D*F) + 4*T*D
                         (probe query, keys/values of all T tokens, out_proj, MLP on the one pooled
                         token, and its attention over T tokens)
            total        conv + L*layer + head

        Element-wise work (layer norms, GELU, softmax, bias and residual adds, position table) is
        left out: it is well under 1 % of the total for these geometries.
        """
        t, d, f = self.tokens, self.hidden, self.intermediate
        conv = 2 * t * (self.channels * self.patch * self.patch) * d
        layer = 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d
        head = 2 * (d * d + 2 * t * d * d + d * d + 2 * d * f) + 4 * t * d if self.head else 0
        return float(conv + self.layers * layer + head)

    def param_count(self) -> int:
        d, f, c, p = self.hidden, self.intermediate, self.channels, self.patch
        layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        head = (d + 3 * d * d + 3 * d + d * d + d + 2 * d + d * f + f + f * d + d) if self.head else 0
        return (c * p * p * d + d) + self.tokens * d + self.layers * layer + 2 * d + head


BASE_224 = Geometry("base-224", 768, 3072, 12, 12, 16, 224)
SO400M_384 = Geometry("so400m-384", 1152, 4304, 27, 16, 14, 384)
GEOMETRIES = {g.name: g for g in (BASE_224, SO400M_384)}
FULL_LAYERS = {g.name: g.layers for g in GEOMETRIES.values()}
#: used only to trigger lazy imports before a memory baseline
PRIMER = Geometry("primer", 64, 128, 1, 4, 8, 32)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds ``fn()`` takes (device work included) and what it returned."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def pixels(batch: int, image: int, seed: int, device: torch.device) -> torch.Tensor:
    """A fixed fp32 batch (what an image processor hands over); each model casts it to its dtype."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image, image, generator=gen).to(device)


def median(values: list[float]) -> float:
    return statistics.median(values)


def gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def matmul_ceiling(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seconds: float = 0.6) -> dict:
    """GFLOP/s of a plain ``F.linear((m, k), (n, k))`` (no bias): median of >= 3 timed calls."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
    with torch.inference_mode():
        first, _ = timed(lambda: F.linear(a, w), device)  # warm-up
        reps = max(3, min(50, int(seconds / max(first, 1e-6))))
        times = [timed(lambda: F.linear(a, w), device)[0] for _ in range(reps)]
    flops = 2.0 * m * k * n
    mid = median(times)
    return {"gflops": flops / mid / 1e9, "best_gflops": flops / min(times) / 1e9, "shape": [m, k, n],
            "reps": reps, "seconds": mid}


def best_ceiling(*measured: dict) -> dict:
    """The higher of ceilings measured around a cell (a busy moment only lowers a ceiling)."""
    best = max(measured, key=lambda c: c["gflops"])
    return {**best, "all_gflops": [c["gflops"] for c in measured]}


def outputs_of(out: Any) -> dict[str, torch.Tensor]:
    """``last_hidden_state`` (and ``pooler_output`` when there is one) as fp32 CPU tensors."""
    found = {"last_hidden_state": out.last_hidden_state}
    if getattr(out, "pooler_output", None) is not None:
        found["pooler_output"] = out.pooler_output
    return {k: v.detach().float().cpu() for k, v in found.items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if k in b)


def scale_of(a: dict[str, torch.Tensor]) -> float:
    return max(float(v.abs().max()) for v in a.values())


def parity(ours: dict, theirs: dict, dtype_name: str, fp32_ref: Optional[dict]) -> dict:
    """Max abs difference ours vs transformers, and whether it is sane.

    fp32: within 1e-4 of the outputs' largest magnitude. bf16: both are compared with transformers' fp32
    outputs on the same input when available, and ours may be off by at most 1.5x transformers' own
    bf16 error (+1e-3 of the scale); without an fp32 reference, within 5e-2 of the scale.
    """
    diff, scale = max_abs_diff(ours, theirs), scale_of(theirs)
    result: dict[str, Any] = {"max_abs_diff": diff, "scale": scale}
    if dtype_name == "fp32":
        result["ok"] = diff <= 1e-4 * max(scale, 1.0)
        result["text"] = f"{diff:.1e}"
    elif fp32_ref is not None:
        err_ours, err_theirs = max_abs_diff(ours, fp32_ref), max_abs_diff(theirs, fp32_ref)
        result.update(ours_vs_fp32=err_ours, theirs_vs_fp32=err_theirs)
        result["ok"] = err_ours <= 1.5 * err_theirs + 1e-3 * scale
        result["text"] = f"{diff:.1e} (vs fp32: ours {err_ours:.1e}, tf {err_theirs:.1e})"
    else:
        result["ok"] = diff <= 5e-2 * max(scale, 1.0)
        result["text"] = f"{diff:.1e}"
    result["text"] += "" if result["ok"] else " TOO LARGE"
    return result


def offline_hub() -> None:
    """Switch the Hub off for this run (every checkpoint here is a local directory); entry points call it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
