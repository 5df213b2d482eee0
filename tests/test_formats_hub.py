"""open_clip and timm repos by repo id, from the local Hub look-alike (tests/hub_server.py), through huggingface_hub.

An open_clip repo holds both towers in ``open_clip_model.safetensors`` (here the text tower is several times
the image tower) beside ``open_clip_config.json`` and the pickle twin ``open_clip_pytorch_model.bin``; a timm
repo holds ``model.safetensors`` and ``config.json``. Loading by repo id fetches only the image trunk's
bytes (``visual.trunk.*``), never the text tower nor the pickle, and gives open_clip's / timm's numbers.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from tp_siglip import SiglipVisionTransformer
from tp_siglip.loader import read_header

import oracles
from hub_server import HubServer
from test_hub import BYTES_FACTOR, own_repo_dir, point_hf_at

OPEN_CLIP, TIMM = "test-org/open-clip-siglip-tiny", "test-org/timm-siglip-tiny"


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("format-repos")
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    clip, timm_tower = oracles.open_clip_model(21, root), oracles.timm_model(oracles.MAP_ARCH, 22)
    folders = {OPEN_CLIP: oracles.save_open_clip(clip, root / "open_clip"), TIMM: oracles.save_timm(timm_tower, root / "timm")}
    (folders[OPEN_CLIP] / "open_clip_pytorch_model.bin").write_bytes(b"a pickle twin, never to be fetched")
    weights = read_header(folders[OPEN_CLIP] / "open_clip_model.safetensors")
    trunk = sum(info.nbytes for name, info in weights.items() if name.startswith("visual.trunk."))
    assert sum(info.nbytes for info in weights.values()) > 4 * trunk  # the text tower dwarfs the image tower
    with torch.no_grad():
        refs = {OPEN_CLIP: clip.encode_image(pixels), TIMM: oracles.timm_outputs(timm_tower, pixels)["pooler_output"]}
    with HubServer() as server:
        for repo_id, folder in folders.items():
            server.add_repo(repo_id, folder)
        yield SimpleNamespace(server=server, folders=folders, trunk=trunk, pixels=pixels, refs=refs)


def test_open_clip_repo_fetches_only_the_image_trunk(repos: SimpleNamespace, tmp_path: Path, monkeypatch) -> None:
    """Weight bytes served <= 1.02x the trunk's own bytes; the cached tower holds only ``visual.trunk.*``; the
    pooled output is open_clip's ``encode_image``; a second load fetches nothing."""
    point_hf_at(monkeypatch, repos.server.endpoint, tmp_path / "cache")
    repos.server.reset_counts()
    model = SiglipVisionTransformer.from_pretrained(OPEN_CLIP)
    served = repos.server.weight_bytes(OPEN_CLIP)
    assert repos.trunk <= served <= BYTES_FACTOR * repos.trunk, (served, repos.trunk)
    snapshot = next((own_repo_dir(tmp_path / "cache", OPEN_CLIP) / "snapshots").iterdir())
    cached = load_file(str(snapshot / "model.safetensors"))
    assert cached and all(name.startswith("visual.trunk.") for name in cached)
    assert (snapshot / "open_clip_config.json").is_file()
    with torch.no_grad():
        assert (model(repos.pixels).pooler_output - repos.refs[OPEN_CLIP]).abs().max() <= 1e-4
    assert model.config.preprocessing is not None and model.config.preprocessing.library == "open_clip"
    repos.server.reset_counts()
    SiglipVisionTransformer.from_pretrained(OPEN_CLIP)
    assert repos.server.weight_bytes(OPEN_CLIP) == 0


def test_timm_repo_by_repo_id(repos: SimpleNamespace, tmp_path: Path, monkeypatch) -> None:
    point_hf_at(monkeypatch, repos.server.endpoint, tmp_path / "cache")
    model = SiglipVisionTransformer.from_pretrained(TIMM, world_size=1)
    with torch.no_grad():
        assert (model(repos.pixels).pooler_output - repos.refs[TIMM]).abs().max() <= 1e-4
    assert model.config.hidden_act == "gelu" and model.config.preprocessing.library == "timm"
