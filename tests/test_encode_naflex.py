"""``tp-siglip encode`` with a SigLIP2 NaFlex tower: images of mixed sizes in one batch, one unreadable file.

Every embedding is compared with transformers' own pipeline on the same files and weights:
``Siglip2ImageProcessorPil`` (what ``Siglip2ImageProcessor`` is without torchvision) then
``Siglip2VisionModel``. One tiny NaFlex checkpoint serves the module; its ``preprocessor_config.json`` says
``max_num_patches`` 24 (not transformers' 256), so the default is seen to come from the checkpoint. Two
torchrun launches (2 ranks, tensor and data mode); the rest runs ``main()`` in this process, plus one
task on the session's 2-rank pool for the lockstep of ranks that read a file differently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tp_siglip import SiglipVisionTransformer, encode, encode_checks
from tp_siglip.processing_naflex import preprocess_naflex, preprocess_naflex_files

import towers
from distributed import encode_main_captured

REPO = Path(__file__).resolve().parents[1]
MAX_PATCHES = 24  # in the checkpoint's preprocessor_config.json
TOLERANCE = 1e-4  # float32 on both sides; measured differences are ~2e-6
TIMEOUT_S = 240
#: name -> (height, width, mode): wide, tall, square, gray, tiny, a strip; each gets another grid
GOOD = {
    "a_wide.png": (20, 60, "RGB"),
    "b_tall.png": (64, 16, "RGB"),
    "d_square.jpg": (70, 70, "RGB"),
    "e_gray.png": (33, 20, "L"),
    "f_tiny.png": (5, 7, "RGB"),
    "g_strip.png": (9, 90, "RGB"),
}
BROKEN = "c_broken.png"  # lands in the first batch of 3, between good files


def _reference(model, paths: list[str], max_num_patches: int) -> dict[str, torch.Tensor]:
    """transformers' processor + model on ``paths``: the inputs, the outputs and the masked mean."""
    try:
        from transformers import Siglip2ImageProcessorPil as Processor
    except ImportError:  # transformers 4.x
        from transformers import Siglip2ImageProcessor as Processor

    inputs = Processor()(paths, return_tensors="pt", patch_size=8, max_num_patches=max_num_patches)
    with torch.no_grad():
        out = model(**{k: inputs[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")})
    mask = inputs["pixel_attention_mask"].bool()
    valid = out.last_hidden_state.masked_fill(~mask[..., None], 0.0)
    mean = valid.sum(1) / mask.sum(1, keepdim=True)
    return {  # the stored embeddings are L2-normalised (the default)
        "pooler_output": torch.nn.functional.normalize(out.pooler_output, dim=-1),
        "last_hidden_state": out.last_hidden_state,
        "mean_pooled": torch.nn.functional.normalize(mean, dim=-1),
        "raw_mean_pooled": mean,
        "pixel_attention_mask": inputs["pixel_attention_mask"],
        "spatial_shapes": inputs["spatial_shapes"],
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The checkpoint (with preprocessor_config.json), the images, and transformers' results at 24 patches."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("naflex-encode")
    model, checkpoint = towers.siglip2_vision(root / "checkpoint", seed=5)
    (checkpoint / "preprocessor_config.json").write_text(json.dumps({"max_num_patches": MAX_PATCHES, "patch_size": 8}))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (height, width, mode) in GOOD.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode).save(images / name)
    (images / BROKEN).write_text("not an image\n")
    paths = [str(images / name) for name in sorted(GOOD)]
    return model, checkpoint, images, paths, _reference(model, paths, MAX_PATCHES)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (safe_open is not iterable)


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def _check_tokens(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Valid tokens equal transformers', padding rows are zero, mask and grids equal transformers'."""
    mask = reference["pixel_attention_mask"].bool()
    assert torch.equal(tensors["pixel_attention_mask"], reference["pixel_attention_mask"].float())
    assert torch.equal(tensors["spatial_shapes"], reference["spatial_shapes"].float())
    tokens = tensors["last_hidden_state"]
    assert tokens.shape == reference["last_hidden_state"].shape
    _close(tokens[mask], reference["last_hidden_state"][mask])
    assert (~mask).any() and torch.count_nonzero(tokens[~mask]) == 0


def _check_run(tensors, metadata, paths, reference, images) -> None:
    assert sorted(tensors) == ["last_hidden_state", "pixel_attention_mask", "pooler_output", "spatial_shapes"]
    _close(tensors["pooler_output"], reference["pooler_output"])
    _check_tokens(tensors, reference)
    assert json.loads(metadata["paths"]) == paths
    assert metadata["max_num_patches"] == str(MAX_PATCHES) and metadata["complete"] == "true"
    ((skipped, reason),) = json.loads(metadata["skipped"])
    assert skipped == str(images / BROKEN) and "not an image" in reason
    assert len({tuple(s) for s in reference["spatial_shapes"].tolist()}) >= 5  # the batch mixes grids


# ----------------------------------------------------------------------------- 2 ranks under torchrun


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TP_SIGLIP_PG_TIMEOUT_S": "60"}
    return subprocess.run(
        [*launcher, "-m", "tp_siglip.encode", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


@pytest.fixture(scope="module", params=["2", "1"])
def two_ranks(request, setup):
    """A torchrun run per --tp (one group of 2 tensor-parallel ranks, two data-parallel ones): 2 ranks, --tokens,
    batches of 3 (the broken file in the first one)."""
    _, checkpoint, images, _, _ = setup
    output = images.parent / f"{request.param}.safetensors"
    args = [str(images), "--model", str(checkpoint), "--output", str(output), "--tokens", "--batch-size", "3"]
    proc = _torchrun([*args, "--tp", request.param])
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return request.param, *_read(output), proc.stdout


def test_two_ranks_match_transformers(setup, two_ranks):
    _, checkpoint, images, paths, reference = setup
    mode, tensors, metadata, stdout = two_ranks
    _check_run(tensors, metadata, paths, reference, images)
    assert metadata["tp"] == mode and metadata["world_size"] == "2"
    assert f"NaFlex max_num_patches {MAX_PATCHES} (from {checkpoint / 'preprocessor_config.json'})" in stdout
    assert f"skipped {images / BROKEN}: " in stdout and stdout.count("images/s") == 1


# ----------------------------------------------------------------------------- one process


def _main(argv: list, capsys) -> tuple[int, str, str]:
    code = encode.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return code, captured.out, captured.err


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(encode, "_load_model", refuse)


def test_headless_tower_averages_valid_patches_only(setup, tmp_path, capsys):
    _, checkpoint, images, paths, reference = setup
    headless = tmp_path / "headless"
    shutil.copytree(checkpoint, headless)
    config = json.loads((headless / "config.json").read_text())
    (headless / "config.json").write_text(json.dumps({**config, "vision_use_head": False}))  # head.* left unused
    code, out, err = _main([images, "--model", headless, "--output", tmp_path / "o.safetensors", "--batch-size", "4"], capsys)
    assert code == 0, err
    tensors, metadata = _read(tmp_path / "o.safetensors")
    assert sorted(tensors) == ["mean_pooled"] and metadata["embedding"] == "mean_pooled"
    _close(tensors["mean_pooled"], reference["mean_pooled"])
    naive = reference["last_hidden_state"].mean(1)  # padding included: what must not be stored
    assert (naive - reference["raw_mean_pooled"]).abs().max() > 100 * TOLERANCE
    assert "mean of last_hidden_state over each image's valid patches" in out


def test_explicit_max_num_patches_and_resume(setup, tmp_path, capsys):
    model, checkpoint, images, paths, _ = setup
    reference = _reference(model, paths, 12)
    output = tmp_path / "r.safetensors"
    common = [images, "--model", checkpoint, "--output", output, "--tokens", "--batch-size", "2"]
    code, out, err = _main([*common, "--max-num-patches", "12"], capsys)
    assert code == 0, err
    assert "NaFlex max_num_patches 12 (from --max-num-patches)" in out
    tensors, metadata = _read(output)
    assert json.loads(metadata["paths"]) == paths and metadata["max_num_patches"] == "12"
    _close(tensors["pooler_output"], reference["pooler_output"])
    _check_tokens(tensors, reference)

    before = output.read_bytes()
    code, out, err = _main([*common, "--max-num-patches", "12", "--resume"], capsys)
    assert code == 0 and "summary: 0 encoded" in out, err
    code, _, err = _main([*common, "--resume"], capsys)  # the checkpoint's default, 24: refused
    assert code == 2
    (line,) = _errors(err)
    assert "max_num_patches 12" in line and f"uses {MAX_PATCHES}" in line and "--max-num-patches 12" in line, line
    assert output.read_bytes() == before


@pytest.mark.parametrize("value", ["0", "-3", "many", "2.5"])
def test_bad_max_num_patches_exits_2(value, capsys, no_model_load):
    with pytest.raises(SystemExit) as exit_info:
        encode.main(["--max-num-patches", value])
    assert exit_info.value.code == 2
    assert "argument --max-num-patches: expected a positive integer" in capsys.readouterr().err


def test_max_num_patches_refused_for_fixed_resolution_tower(tiny_checkpoint, setup, tmp_path, capsys, monkeypatch):
    _, fixed = tiny_checkpoint
    _, _, images, _, _ = setup
    argv = [images / "a_wide.png", "--model", fixed, "--output", tmp_path / "o.safetensors", "--max-num-patches", "64"]
    real_load = encode._load_model
    monkeypatch.setattr(encode, "_load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    code, _, err = _main(argv, capsys)  # its config.json is on disk: refused before loading
    assert code == 2
    (line,) = _errors(err)
    assert "--max-num-patches 64" in line and "fixed-resolution" in line and "drop --max-num-patches" in line
    monkeypatch.setattr(encode, "_load_model", real_load)
    monkeypatch.setattr(encode_checks, "_file_on_disk", lambda model, name, revision=None: None)  # as for a Hub repo not cached yet
    code, _, err = _main(argv, capsys)  # refused once loaded
    assert code == 2 and len(_errors(err)) == 1 and "fixed-resolution" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_default_from_hub_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert encode_checks.checkpoint_max_num_patches("test-org/naflex") == (256, "transformers' default")
    repo = tmp_path / "cache" / "models--test-org--naflex"
    sha = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "preprocessor_config.json").write_text('{"max_num_patches": 729}')
    value, source = encode_checks.checkpoint_max_num_patches("test-org/naflex")
    assert value == 729 and source.endswith("preprocessor_config.json")


def test_default_from_a_hub_repo_fetched_by_this_run(setup, tmp_path, monkeypatch, capsys):
    """A NaFlex repo id that is not in the cache yet: the job fetches the repo's preprocessor_config.json with
    the tower and uses its max_num_patches, not transformers' default (and a second run agrees); a download of
    whole files brings it too."""
    from hub_server import HubServer
    from test_hub import point_hf_at

    _, checkpoint, images, _, _ = setup
    with HubServer() as server:
        server.add_repo("test-org/naflex", checkpoint)
        point_hf_at(monkeypatch, server.endpoint, tmp_path / "cache")
        for run in ("first", "second"):
            output = tmp_path / f"{run}.safetensors"
            code, out, err = _main([images / "a_wide.png", "--model", "test-org/naflex", "--output", output], capsys)
            assert code == 0, err
            assert f"NaFlex max_num_patches {MAX_PATCHES} (from " in out, out
            assert _read(output)[1]["max_num_patches"] == str(MAX_PATCHES)
        whole = SiglipVisionTransformer.from_pretrained("test-org/naflex", download="files", cache_dir=tmp_path / "files")
    assert json.loads((whole.checkpoint_dir / "preprocessor_config.json").read_text())["max_num_patches"] == MAX_PATCHES


def test_bad_preprocessor_config_stops_a_naflex_run(setup, tmp_path, capsys):
    _, checkpoint, images, _, _ = setup
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "preprocessor_config.json").write_text('{"max_num_patches": "many"}')
    argv = [images / "a_wide.png", "--model", broken, "--output", tmp_path / "o.safetensors"]
    code, _, err = _main(argv, capsys)
    assert code == 2
    (line,) = _errors(err)
    assert "max_num_patches must be a positive integer, got 'many'" in line and "--max-num-patches" in line
    code, _, err = _main([*argv, "--max-num-patches", "8"], capsys)  # the option overrides the file
    assert code == 0, err


def test_help_shows_the_option(capsys):
    with pytest.raises(SystemExit):
        encode.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-num-patches N" in text and "preprocessor_config.json, else 256" in text
    assert "pixel_attention_mask (N, max_num_patches) and spatial_shapes (N, 2)" in text


def test_preprocess_naflex_files(setup, tmp_path):
    _, _, images, paths, _ = setup
    (tmp_path / "empty.png").write_bytes(b"")
    files = [paths[0], images / BROKEN, tmp_path / "empty.png", tmp_path / "gone.png", paths[1]]
    inputs, reasons = preprocess_naflex_files(files, patch_size=8, max_num_patches=20, dtype=torch.bfloat16)
    assert reasons[0] is None and reasons[4] is None
    assert "not an image" in reasons[1] and reasons[2] == "empty file (0 bytes)" and "not found" in reasons[3]
    expected = preprocess_naflex([paths[0], paths[1]], patch_size=8, max_num_patches=20)
    assert inputs["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(inputs["pixel_values"][[0, 4]], expected["pixel_values"].to(torch.bfloat16))
    for key in ("pixel_attention_mask", "spatial_shapes"):
        assert inputs[key].dtype == expected[key].dtype and torch.equal(inputs[key][[0, 4]], expected[key])
    # unreadable rows: a valid 1x1 placeholder of one zero patch
    assert inputs["spatial_shapes"][1:4].tolist() == [[1, 1]] * 3
    assert inputs["pixel_attention_mask"][1:4].sum(1).tolist() == [1, 1, 1]
    assert torch.count_nonzero(inputs["pixel_values"][1:4]) == 0
    with pytest.raises(ValueError, match="max_num_patches must be a positive int, got 0"):
        preprocess_naflex_files(files, patch_size=8, max_num_patches=0)


# ----------------------------------------------------------------------------- ranks that read files differently


def _rank_task(rank: int, world_size: int, argv: list[str], flaky: str, turned: str) -> tuple:
    """Rank 1 cannot read ``flaky``, sees ``turned`` transposed and is given another --max-num-patches."""
    from tp_siglip import processing

    real = processing.load_image
    if rank == 1:

        def differs(path):
            if str(path) == flaky:
                raise ValueError(f"Cannot read image file '{path}'") from OSError("stale file handle")
            image = real(path)
            return image.transpose(Image.Transpose.TRANSPOSE) if str(path) == turned else image

        processing.load_image = differs
        argv = [*argv, "--max-num-patches", "16"]
    try:
        return encode_main_captured(argv)
    finally:
        processing.load_image = real


def test_ranks_that_read_files_differently_stay_in_lockstep(setup, rank_pools, tmp_path):
    """The rank that decodes an image decides: batches of 4 over 2 ranks split 2/2, so rank 1 decodes d_square
    (and cannot read it: skipped with its reason) but not b_tall (it would see it transposed: rank 0's pixels
    are used). Every rank uses rank 0's max_num_patches."""
    model, checkpoint, images, paths, _ = setup
    turned, flaky = paths[1], paths[2]
    assert Path(turned).name.startswith("b_") and Path(flaky).name.startswith("d_")
    output = tmp_path / "lockstep.safetensors"
    argv = [str(images), "--model", str(checkpoint), "--output", str(output), "--batch-size", "4"]
    (code0, out0, err0), (code1, _, err1) = rank_pools[1](2).run(
        _rank_task, [*argv, "--max-num-patches", "12"], flaky, turned, timeout=180
    )
    assert code0 == 0 and code1 == 0, (err0, err1)
    assert "this rank found 16 (from --max-num-patches), rank 0 uses 12" in err1, err1
    assert f"skipped {flaky}: OSError: stale file handle" in out0.splitlines(), out0
    tensors, metadata = _read(output)
    kept = [p for p in paths if p != flaky]
    assert json.loads(metadata["paths"]) == kept and metadata["max_num_patches"] == "12"
    _close(tensors["pooler_output"], _reference(model, kept, 12)["pooler_output"])
