"""Cheap tests of the GPU check's pieces (benchmarks/gpu_throughput.py, gpu.sh, docs/gpu-check.md) on the CPU.

The whole check is rehearsed offline by benchmarks/gpu_rehearsal.sh (CI runs it: it needs the package
registry for its wheelhouse); these tests cover the arithmetic, the CPU side of the timing and CUDA-graph
code, one end-to-end run of a tiny geometry in process, and that gpu.sh's time limits agree with the
timeout the page tells callers to use. No timing is asserted.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_throughput as gt  # noqa: E402
from benchmarks.common import Geometry  # noqa: E402

TINY = Geometry("tiny", hidden=64, intermediate=96, layers=1, heads=4, patch=8, image=32)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _progress_bars_back_on():
    """The benchmarks' ``quiet_transformers`` turns progress bars off process-wide (huggingface_hub's too):
    turn them back on, so later tests (the Hub's tqdm bar) see the defaults."""
    yield
    import transformers
    from huggingface_hub.utils import enable_progress_bars

    transformers.utils.logging.enable_progress_bar()
    enable_progress_bars()


def test_mfu_is_the_share_of_the_peak_reached() -> None:
    flops, peak = TINY.flops_per_image(), gt.gemm_flops(64, 128, 256) * 10
    assert gt.mfu(peak / flops, flops, peak) == pytest.approx(1.0)
    assert gt.mfu(peak / flops / 4, flops, peak) == pytest.approx(0.25)
    assert gt.gemm_flops(3, 5, 7) == 2 * 3 * 5 * 7


def test_time_calls_on_cpu_times_each_call_after_warmup() -> None:
    calls: list[int] = []
    times, first = gt.time_calls(lambda: calls.append(len(calls)) or len(calls), CPU, warmup=2, iters=3)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert first == 1 and len(calls) == 2 + 3


def test_measure_peak_on_cpu() -> None:
    peak = gt.measure_peak(CPU, torch.bfloat16, size=64, iters=3)
    assert peak["best_tflops"] >= peak["median_tflops"] > 0 and peak["shape"] == [64, 64, 64]


def test_graph_variants_say_why_on_cpu_and_restore_check_finite() -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        gt.capture_graph(lambda s: s * 2, torch.ones(2))
    ours = torch.nn.Identity()
    ours.check_finite = True  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="CUDA"):
        gt.variant_call("ours+graph", {"ours": ours}, torch.ones(2))
    assert ours.check_finite is True
    with pytest.raises(ValueError, match="unknown variant"):
        gt.variant_call("nope", {}, torch.ones(2))


def test_tiny_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.json"
    plan = gt.Plan(device=CPU, dtype_name="bf16", geometries=[TINY], batches=[1, 2], warmup=1, iters=1,
                   compile=True, budget_s=0.0, peak_size=64, json=out)  # compile rows: skipped, past the budget
    report = gt.run(plan)
    cells = json.loads(out.read_text())["cells"]
    expected = [v for _ in plan.batches for v in gt.VARIANTS[:4]] + [gt.VARIANTS[4]] * len(plan.batches)
    assert [c["variant"] for c in cells] == expected
    assert all(c["error"].startswith("skipped") for c in cells if c["variant"] == "ours+compile")
    assert all("error" in c for c in cells if c["variant"].endswith("+graph"))
    ours = [c for c in cells if c["variant"] == "ours"]
    assert all(c["parity"]["ok"] and c["mfu"] > 0 for c in ours)
    assert all("outputs" not in c for c in cells) and len(report["cells"]) == len(cells)
    printed = capsys.readouterr().out
    assert printed.count("\n| tiny") == len(cells)
    assert "not a CUDA run" in gt.memory_report(out)


def test_row_text_has_every_column() -> None:
    cell = {"geometry": "g", "batch": 4, "variant": "ours", "img_s": 3.0, "vs_transformers": 1.5, "tflops": 0.1,
            "mfu": 0.5, "peak_bytes": 2e9, "growth_bytes": 1e9, "diff_text": "1e-3"}
    for row in (gt.row_text(cell), gt.row_text({**cell, "error": "why"})):
        assert row.count("|") == len(gt.COLUMNS) + 1
    assert "not run: why" in gt.row_text({**cell, "error": "why"})


def test_gpu_sh_limits_fit_the_documented_timeout() -> None:
    script = (ROOT / "benchmarks" / "gpu.sh").read_text()
    page = (ROOT / "docs" / "gpu-check.md").read_text()
    deadline = int(re.search(r"TP_SIGLIP_GPU_BUDGET_S:-(\d+)", script).group(1))
    limits = [int(n) for n in re.findall(r"^\s*(?:\[.*\] && )?step \w+ (\d+) ", script, flags=re.M)]
    timeout_s = int(re.search(r"`timeout_s` \| `(\d+)`", page).group(1))
    assert len(limits) == len(re.findall(r"\bstep \w+ \d+ ", script)) >= 5
    assert sum(limits) <= deadline < timeout_s
    assert f"deadline of {deadline} s" in page
    assert "pip install -q --no-index --no-deps" in script and "-e ." not in script
