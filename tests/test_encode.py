"""The main job, run as users run it: ``torchrun -m tp_siglip.encode`` and ``examples/encode.py`` under torchrun
(2 CPU ranks), and ``python -m tp_siglip encode`` (one process).

Its embeddings must match transformers' own pipeline on the same files: ``SiglipImageProcessor`` (the
PIL backend, ``tests/references.py``) then ``SiglipVisionModel`` with the same weights.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from checkpoints import TINY, save_layout, vision_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = [str(REPO / "examples" / "encode.py")]
MODULE = ["-m", "tp_siglip.encode"]  # torchrun's -m, like python's
COMMAND = ["-m", "tp_siglip", "encode"]  # what the tp-siglip console script runs (one process)
IMAGES = "src/tp_siglip/images"  # the bundled photos, relative to REPO, the working directory of every run
CONFIG = {**TINY, "image_size": 64, "patch_size": 16}  # 16 patches of 16 px
TOLERANCE = 2e-3
TIMEOUT_S = 180


def _expected_paths() -> list[str]:
    files = [p for p in (REPO / IMAGES).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"}]
    return [f"{IMAGES}/{p.name}" for p in sorted(files)]


def _run(args: list[str], ranks: int = 2, entry: list[str] = SCRIPT) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TP_SIGLIP_PG_TIMEOUT_S": "60"}
    return subprocess.run(
        [*launcher, *entry, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _encode(
    args: list[str], ranks: int = 2, entry: list[str] = SCRIPT
) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Run the job, require success, and return (tensors, metadata, stdout) of the file it wrote."""
    output = Path(args[args.index("--output") + 1])
    proc = _run(args, ranks, entry)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    with safe_open(str(output), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata(), proc.stdout  # noqa: SIM118 (safe_open is not iterable)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A headed and a head-less checkpoint of one random tower, and transformers' outputs on the images."""
    from transformers.utils import logging as hf_logging

    from references import siglip_image_processor

    root = tmp_path_factory.mktemp("encode")
    model = vision_model(CONFIG, seed=7)
    headed = save_layout(model, "v5_vision", root / "headed")
    headless = save_layout(model, "paligemma_v5", root / "headless")
    hf_logging.set_verbosity_error()  # the "no torchvision, using the PIL backend" notice
    processor = siglip_image_processor(size={"height": CONFIG["image_size"], "width": CONFIG["image_size"]})
    pixels = processor(images=[str(REPO / p) for p in _expected_paths()], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels)
    unit = functools.partial(torch.nn.functional.normalize, dim=-1)  # the stored embedding (the default)
    reference = {
        "pooler_output": unit(out.pooler_output),
        "raw_pooler_output": out.pooler_output,
        "last_hidden_state": out.last_hidden_state,
        "mean_pooled": unit(out.last_hidden_state.mean(dim=1)),
    }
    return root, headed, headless, reference


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= TOLERANCE


@pytest.fixture(scope="module")
def tensor_run(setup):
    root, headed, _, _ = setup
    output = root / "tensor.safetensors"
    return _encode(
        ["--model", str(headed), IMAGES, "--output", str(output), "--tokens", "--batch-size", "2", "--tp", "2"], entry=MODULE
    )


def test_tensor_parallel_matches_transformers(setup, tensor_run):
    _, headed, _, reference = setup
    tensors, metadata, _ = tensor_run
    assert sorted(tensors) == ["last_hidden_state", "pooler_output"]  # --tokens adds last_hidden_state
    _close(tensors["pooler_output"], reference["pooler_output"])
    _close(tensors["last_hidden_state"], reference["last_hidden_state"])
    assert json.loads(metadata["paths"]) == _expected_paths()
    assert metadata["model"] == str(headed)
    assert metadata["world_size"] == "2"
    assert metadata["tp"] == "2"
    assert metadata["dtype"] == "float32"
    assert metadata["embedding"] == "pooler_output"
    assert metadata["normalized"] == "true" and metadata["output_dtype"] == "float32"
    assert metadata["complete"] == "true" and json.loads(metadata["skipped"]) == []


def test_prints_speed_and_similarity_table_on_rank_0_only(tensor_run):
    _, _, stdout = tensor_run
    assert stdout.count("images/s") == 1, stdout
    assert stdout.count("cosine similarity") == 1, stdout
    names = [Path(p).stem for p in _expected_paths()[:5]]
    header = [line.split() for line in stdout.splitlines() if line.split() == names]
    assert len(header) == 1, stdout
    rows = [line.split() for line in stdout.splitlines() if len(line.split()) == 6 and line.split()[0] in names]
    assert [row[0] for row in rows] == names, stdout
    for i, row in enumerate(rows):
        assert float(row[1 + i]) == pytest.approx(1.0, abs=1e-3)  # an image is its own nearest match


def test_data_parallel_gives_the_same_embeddings(setup, tensor_run):
    root, headed, _, reference = setup
    output = root / "data.safetensors"
    # batch size 3 over 2 ranks: uneven split (2 + 1), then a short last batch (2 images, 1 + 1); raw vectors
    tensors, metadata, _ = _encode(["--model", str(headed), IMAGES, "--output", str(output), "--batch-size", "3", "--no-normalize"])
    assert sorted(tensors) == ["pooler_output"]  # no --tokens: no last_hidden_state
    assert metadata["tp"] == "1" and metadata["normalized"] == "false"  # the default --tp: data parallel
    _close(tensors["pooler_output"], reference["raw_pooler_output"])
    unit = torch.nn.functional.normalize(tensors["pooler_output"], dim=-1)
    torch.testing.assert_close(unit, tensor_run[0]["pooler_output"], rtol=1e-5, atol=1e-5)


def test_two_tensor_groups_write_one_file(setup):
    """4 ranks, --tp 2: two tensor-parallel groups each run their half of every batch; rank 0 gathers the rows."""
    root, headed, _, reference = setup
    output = root / "groups.safetensors"
    tensors, metadata, _ = _encode(["--model", str(headed), IMAGES, "--output", str(output), "--tp", "2", "--batch-size", "3"], ranks=4)
    assert metadata["tp"] == "2" and metadata["world_size"] == "4"
    assert json.loads(metadata["paths"]) == _expected_paths()
    _close(tensors["pooler_output"], reference["pooler_output"])


def test_single_process_headless_tower_stores_mean_pooled(setup):
    root, _, headless, reference = setup
    output = root / "single.safetensors"
    tensors, metadata, stdout = _encode(["--model", str(headless), IMAGES, "--output", str(output)], ranks=1, entry=COMMAND)
    assert sorted(tensors) == ["mean_pooled"]
    _close(tensors["mean_pooled"], reference["mean_pooled"])
    assert metadata["embedding"] == "mean_pooled"
    assert metadata["world_size"] == "1"
    assert json.loads(metadata["paths"]) == _expected_paths()
    assert "no pooling head" in stdout
    assert "summary: 5 encoded, 0 skipped (unreadable or missing), 1 ignored by extension (.md: 1)" in stdout  # SOURCES.md


def test_no_images_fails_cleanly_on_every_rank(setup):
    root, headed, _, _ = setup
    empty = root / "empty"
    empty.mkdir()
    proc = _run(["--model", str(headed), str(empty), "--output", str(root / "none.safetensors")])
    assert proc.returncode != 0
    # Each rank fails on its own (no collective is involved); torchrun's agent may stop the slower rank
    # before it prints, so at least one rank's message is required, and no rank may crash in encode.py.
    assert "] error: no images or shards found" in proc.stderr
    assert 'encode.py", line' not in proc.stderr
    assert not (root / "none.safetensors").exists()
