"""Loading by Hub repo id, against a local Hub look-alike (tests/hub_server.py), CPU only, no internet.

Test repos (random tiny SigLIP tower, same weights everywhere, transformers' outputs as reference):

* ``VISION``: a SiglipVisionModel (transformers 5 layout, head, no prefix), one file;
* ``FULL``: a full SiglipModel (``vision_model.*`` next to ``text_model.*``), one file;
* ``VLM``: PaliGemma-like (``vision_tower.vision_model.*``, no head) with 16 MiB of extra ``language_model.*``
  tensors, the tower split in three runs laid out *between* language-model tensors, one file;
* ``VLM_SHARDED``: the same tensors over four shards + index: the tower spread over shards 1-3, each time
  between language-model tensors; shard 4 holds only language-model tensors;
* ``PICKLE`` (only ``pytorch_model.bin``), ``NO_TOWER`` (text tensors only), ``GATED`` (``VISION`` behind a gate).

The figures asserted: weight bytes served <= 1.02 x the tower's own bytes (single file and sharded), at
world sizes 1 and 2 (two ranks fetching at once still fetch once), with two dropped connections, and per
node with two torchrun nodes on this host; 0 on a second load, 0 when the Hugging Face cache already holds
the files; offline loads from the cache with the server stopped. Everything goes through the installed
huggingface_hub (0.36+ with transformers 4.x, 2.x with transformers 5; .ci/run tests both) over HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from tp_siglip import hub, tower_cache
from tp_siglip.loader import CheckpointError, read_header, scan_checkpoint

from checkpoints import TINY, save_layout, vision_model
from distributed import run_ranks
from hub_server import Fault, HubServer

VISION = "test-org/siglip-tiny"
FULL = "test-org/siglip-full-tiny"
VLM = "test-org/paligemma-tiny"
VLM_SHARDED = "test-org/paligemma-tiny-sharded"
PICKLE = "test-org/pickle-only"
NO_TOWER = "test-org/text-only"
GATED = "test-org/gated-siglip"
GRANTED_TOKEN = "hf_granted_token"

PREFIXES = {VISION: "", FULL: "vision_model.", VLM: "vision_tower.vision_model.", VLM_SHARDED: "vision_tower.vision_model."}
HAS_HEAD = {VISION: True, FULL: True, VLM: False, VLM_SHARDED: False}
PARITY_REPOS = (VISION, FULL, VLM, VLM_SHARDED)
BYTES_FACTOR = 1.02
FIGURES: dict[str, dict[str, int]] = {}

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


# ----------------------------------------------------------------------------- building the repos


def write_safetensors(path: Path, items: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file with the tensors' bytes laid out in exactly the given order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, tensor in items:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        span = [offset, offset + len(data)]
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": span}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for data in blobs:
            fh.write(data)


def _thirds(items: list[Any]) -> list[list[Any]]:
    k = len(items) // 3
    return [items[:k], items[k : 2 * k], items[2 * k :]]


def _build_vlm(tiny: Any, root: Path) -> tuple[Path, Path]:
    """PaliGemma-like repos with a language model ~16x the tower: one file, and four shards."""
    source = save_layout(tiny, "paligemma_hub", root / "paligemma-source")
    tensors = load_file(str(source / "model.safetensors"))
    config = (source / "config.json").read_bytes()
    gen = torch.Generator().manual_seed(7)
    big = [(f"language_model.model.layers.0.mlp.extra_{i}.weight", torch.randn(512, 1024, generator=gen)) for i in range(8)]
    tower = sorted((k, v) for k, v in tensors.items() if k.startswith("vision_tower."))
    rest = sorted((k, v) for k, v in tensors.items() if not k.startswith("vision_tower."))
    t0, t1, t2 = _thirds(tower)

    single = root / "vlm"
    single.mkdir()
    (single / "config.json").write_bytes(config)
    write_safetensors(single / "model.safetensors", big[:2] + t0 + big[2:3] + rest + t1 + big[3:5] + t2 + big[5:])

    sharded = root / "vlm-sharded"
    sharded.mkdir()
    (sharded / "config.json").write_bytes(config)
    shards = [big[0:1] + t0 + big[1:2], big[2:3] + rest + t1 + big[3:4], big[4:5] + t2 + big[5:6], big[6:8]]
    weight_map, total = {}, 0
    for i, items in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(sharded / name, items)
        for key, value in items:
            weight_map[key] = name
            total += value.numel() * value.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return single, sharded


def tower_bytes(folder: Path, prefix: str) -> int:
    """The tower's own bytes: the sizes of the tensors under ``prefix`` in the repo's safetensors files."""
    return sum(
        info.nbytes
        for path in folder.glob("*.safetensors")
        for key, info in read_header(path).items()
        if key.startswith(prefix)
    )


def source_tower(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in folder.glob("*.safetensors"):
        out.update({k: v for k, v in load_file(str(path)).items() if k.startswith(prefix)})
    return out


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Folders of every test repo, the tower's bytes per repo, inputs and transformers' reference outputs."""
    root = tmp_path_factory.mktemp("hub-repos")
    tiny = vision_model(TINY, seed=11)
    folders = {
        VISION: save_layout(tiny, "v5_vision", root / "vision"),
        FULL: save_layout(tiny, "full_siglip", root / "full"),
    }
    folders[VLM], folders[VLM_SHARDED] = _build_vlm(tiny, root)
    pickle_dir = root / "pickle"
    pickle_dir.mkdir()
    torch.save({"vision_model.embeddings.patch_embedding.weight": torch.zeros(2)}, pickle_dir / "pytorch_model.bin")
    (pickle_dir / "config.json").write_text(json.dumps(tiny.config.to_dict()))
    folders[PICKLE] = pickle_dir
    text_dir = root / "text-only"
    text_dir.mkdir()
    save_file({"text_model.embeddings.token_embedding.weight": torch.randn(100, 32)}, str(text_dir / "model.safetensors"))
    (text_dir / "config.json").write_text(json.dumps({"model_type": "siglip_text_model"}))
    folders[NO_TOWER] = text_dir
    folders[GATED] = folders[VISION]

    pixels = torch.randn(2, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = tiny(pixels, output_hidden_states=True)
    reference = {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
    reference.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
    save_file({"pixels": pixels}, str(root / "inputs.safetensors"))
    towers = {repo: tower_bytes(folders[repo], PREFIXES[repo]) for repo in PARITY_REPOS}
    return SimpleNamespace(root=root, folders=folders, towers=towers, pixels=pixels, reference=reference)


@pytest.fixture(scope="module")
def server(repos: SimpleNamespace) -> Iterator[HubServer]:
    """One Hub look-alike for the module, serving every test repo (tests reset its counters)."""
    with HubServer() as hub_server:
        for repo_id, folder in repos.folders.items():
            hub_server.add_repo(repo_id, folder, tags=("v1",), gated=repo_id == GATED, granted_tokens=(GRANTED_TOKEN,))
        yield hub_server


def point_hf_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache: Path) -> None:
    """Aim tp-siglip at the test server and a fresh cache, as a process would that sets them after import.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE... once, at import; tp-siglip reads the
    environment at call time and hands the endpoint to huggingface_hub explicitly. HF_ENDPOINT is set in the
    environment only (huggingface_hub's import-time copies of it differ between its versions); cache, offline
    flag and token path also in its constants, so that direct huggingface_hub calls in the tests agree.
    """
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache.parent / "no-token-here"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture
def env(server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """The module's server (counters reset, no fault) and an empty cache of this test's own."""
    cache = tmp_path / "hub-cache"
    point_hf_at(monkeypatch, server.endpoint, cache)
    server.reset_counts()
    server.fault = None
    yield SimpleNamespace(server=server, cache=cache, monkeypatch=monkeypatch)
    server.fault = None


def own_repo_dir(cache: Path, repo_id: str) -> Path:
    return cache / "tp-siglip" / ("models--" + repo_id.replace("/", "--"))


def assert_same_tower(directory: Path, folder: Path, prefix: str) -> None:
    """Every tower tensor in ``directory`` equals the source repo's, bit for bit, and nothing else is there."""
    got = source_tower(directory, "")
    want = source_tower(folder, prefix)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def max_diff(out: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], head: bool) -> float:
    keys = [k for k in reference if k != "pooler_output" or head]
    assert sorted(out) == sorted(keys)
    return max((out[k] - reference[k]).abs().max().item() for k in keys)


def run_model(directory_or_repo: str, pixels: torch.Tensor, **kwargs: Any) -> dict[str, torch.Tensor]:
    from tp_siglip import SiglipVisionTransformer

    model = SiglipVisionTransformer.from_pretrained(directory_or_repo, **kwargs)
    with torch.inference_mode():
        out = model(pixels, output_hidden_states=True)
    result = {"last_hidden_state": out.last_hidden_state}
    if out.pooler_output is not None:
        result["pooler_output"] = out.pooler_output
    result.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
    return result


# ----------------------------------------------------------------------------- parity at world sizes 1 and 2


def _hub_worker(rank: int, world_size: int, endpoint: str, cache: str, root: str) -> None:
    """One rank: load every parity repo by repo id (all ranks at once) and save its outputs."""
    os.environ.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=cache, HF_HUB_DISABLE_PROGRESS_BARS="1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        os.environ.pop(name, None)
    import huggingface_hub.constants as constants  # imported after the variables are set, normally

    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = cache, False

    pixels = load_file(str(Path(root) / "inputs.safetensors"))["pixels"]
    for i, repo_id in enumerate(PARITY_REPOS):
        result = run_model(repo_id, pixels, world_size=world_size)
        out_file = Path(root) / f"hub-out-{world_size}-{i}-{rank}.safetensors"
        save_file({k: v.contiguous() for k, v in result.items()}, str(out_file))


@pytest.fixture(scope="module", params=(1, 2), ids=lambda ws: f"ws{ws}")
def spawned(
    request: pytest.FixtureRequest, repos: SimpleNamespace, server: HubServer, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    ws = request.param
    cache = tmp_path_factory.mktemp(f"cache-ws{ws}")
    server.reset_counts()
    server.fault = None
    run_ranks(ws, repos.root, _hub_worker, server.endpoint, str(cache), str(repos.root))
    served = {repo: server.weight_bytes(repo) for repo in PARITY_REPOS}
    outputs = {
        repo: [load_file(str(repos.root / f"hub-out-{ws}-{i}-{r}.safetensors")) for r in range(ws)]
        for i, repo in enumerate(PARITY_REPOS)
    }
    for repo in PARITY_REPOS:
        FIGURES[f"{repo} ws{ws}"] = {"served_weight_bytes": served[repo], "tower_bytes": repos.towers[repo]}
    return SimpleNamespace(ws=ws, cache=cache, served=served, outputs=outputs)


@pytest.mark.parametrize("repo_id", PARITY_REPOS)
def test_parity_with_transformers_by_repo_id(spawned: SimpleNamespace, repos: SimpleNamespace, repo_id: str) -> None:
    """Loaded by repo id, every rank's outputs are within 1e-4 of transformers' SiglipVisionModel."""
    for rank_out in spawned.outputs[repo_id]:
        assert max_diff(rank_out, repos.reference, HAS_HEAD[repo_id]) <= 1e-4


@pytest.mark.parametrize("repo_id", PARITY_REPOS)
def test_only_the_tower_bytes_are_fetched_once(spawned: SimpleNamespace, repos: SimpleNamespace, repo_id: str) -> None:
    """Weight bytes served <= 1.02x the tower's own bytes, even with two ranks loading at the same time."""
    tower = repos.towers[repo_id]
    served = spawned.served[repo_id]
    assert tower <= served <= BYTES_FACTOR * tower, (repo_id, served, tower)
    snapshot = next((own_repo_dir(spawned.cache, repo_id) / "snapshots").iterdir())
    assert_same_tower(snapshot, repos.folders[repo_id], PREFIXES[repo_id])


# ----------------------------------------------------------------------------- two nodes on one host

NODE_RANK_PROGRAM = Path(__file__).with_name("hub_node_rank.py")
NODE_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_each_fetch_the_tower_once(
    env: SimpleNamespace, repos: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun --nnodes 2 on one host, 2 ranks per node, each node with its own HF_HUB_CACHE (and token, to
    tell them apart at the server): each node fetches the tower exactly once, ranks take LOCAL_RANK's device
    (the CPU here), and the outputs equal a one-node load and transformers."""
    port, out = _free_port(), tmp_path / "out"
    out.mkdir()
    procs = []
    for node in range(2):
        node_env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / f"node{node}-cache"), HF_TOKEN=f"hf_node{node}",
                        OMP_NUM_THREADS="1", TP_SIGLIP_PG_TIMEOUT_S="60", HF_HUB_DISABLE_PROGRESS_BARS="1")
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                   "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
                   str(NODE_RANK_PROGRAM), VLM_SHARDED, str(repos.root / "inputs.safetensors"), str(out)]
        procs.append(subprocess.Popen(command, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [proc.communicate(timeout=NODE_TIMEOUT_S)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill() if proc.poll() is None else None
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)

    single = env.server.weight_bytes(VLM_SHARDED) // 2  # what one node fetched, if both fetched the same
    per_node = [env.server.weight_bytes_by_token[f"hf_node{node}"] for node in range(2)]
    assert per_node == [single, single] and repos.towers[VLM_SHARDED] <= single <= BYTES_FACTOR * repos.towers[VLM_SHARDED]
    tower = repos.towers[VLM_SHARDED]
    FIGURES[f"{VLM_SHARDED} per node (2 nodes x 2 ranks)"] = {"served_weight_bytes": single, "tower_bytes": tower}
    for node in range(2):
        snapshots = own_repo_dir(tmp_path / f"node{node}-cache", VLM_SHARDED) / "snapshots"
        (snapshot,) = snapshots.iterdir()
        assert json.loads((snapshot / "tp_siglip_tower.json").read_text())["fetched_bytes"] == single
    facts = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)]
    assert [(f["group_node"], f["local_rank"]) for f in facts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {f["resolved_device"] for f in facts} == {f["param_device"] for f in facts} == {"cpu"}

    one_node = run_model(VLM_SHARDED, repos.pixels)["last_hidden_state"]
    for rank in range(4):
        got = load_file(str(out / f"rank{rank}.safetensors"))["last_hidden_state"]
        torch.testing.assert_close(got, one_node, atol=1e-5, rtol=0)
        torch.testing.assert_close(got, repos.reference["last_hidden_state"], atol=1e-4, rtol=0)


def test_ranks_pick_the_gpu_of_their_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """What from_pretrained does with device=None: CPU without CUDA; with CUDA, cuda:LOCAL_RANK."""
    from tp_siglip.loader import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # no CUDA here to ask
    assert resolve_device(None) == torch.device("cuda", 1)


# ----------------------------------------------------------------------------- cache behaviour


def test_cache_layout_second_load_and_log(
    env: SimpleNamespace, repos: SimpleNamespace, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tower cache keyed by repo and sha with a refs file; a second load serves no weight bytes."""
    env.monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    env.monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys' stderr, looking like a terminal
    caplog.set_level(logging.INFO, logger="tp_siglip")
    path = hub.resolve_checkpoint(VLM_SHARDED)
    sha = env.server.repos[VLM_SHARDED].sha
    own = own_repo_dir(env.cache, VLM_SHARDED)
    assert path == own / "snapshots" / sha
    assert (own / "refs" / "main").read_text() == sha
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tp_siglip_tower.json"]
    assert sorted(p.name for p in (own / "snapshots").iterdir()) == [sha]  # no temporary directory left
    assert (env.cache / "tp-siglip" / ".locks").is_dir()
    assert (path / "config.json").read_bytes() == (repos.folders[VLM_SHARDED] / "config.json").read_bytes()
    assert_same_tower(path, repos.folders[VLM_SHARDED], PREFIXES[VLM_SHARDED])
    manifest = json.loads((path / "tp_siglip_tower.json").read_text())
    assert manifest["commit"] == sha and manifest["prefix"] == PREFIXES[VLM_SHARDED]
    assert manifest["fetched_bytes"] == env.server.weight_bytes(VLM_SHARDED)
    assert sorted(manifest["source_files"]) == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3)]
    # shard 4 (language model only) was never touched
    assert not any(name.startswith("model-00004") for (_, name) in env.server.served)
    lines = [r.getMessage() for r in caplog.records if "fetched" in r.getMessage()]
    assert len(lines) == 1 and VLM_SHARDED in lines[0] and "out of" in lines[0]
    assert "vision tower" in capsys.readouterr().err  # the tqdm bar, on a terminal unless disabled

    env.server.reset_counts()
    assert hub.resolve_checkpoint(VLM_SHARDED) == path
    assert env.server.weight_bytes() == 0


def test_no_download_bar_in_a_log(env: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    """stderr that is no terminal (a log file, CI's output) gets no tqdm bar: its carriage-return updates would fill
    the log; the fetch is still logged."""
    env.monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    assert not sys.stderr.isatty()
    hub.resolve_checkpoint(VISION)
    assert "vision tower" not in capsys.readouterr().err


def test_offline_loads_from_cache_with_server_stopped(
    repos: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After one online load: HF_HUB_OFFLINE=1 makes no request at all; with the server gone it still loads."""
    cache = tmp_path / "hub-cache"
    server = HubServer()
    server.add_repo(VLM, repos.folders[VLM])
    server.start()
    try:
        point_hf_at(monkeypatch, server.endpoint, cache)
        path = hub.resolve_checkpoint(VLM)
        assert repos.towers[VLM] <= server.weight_bytes() <= BYTES_FACTOR * repos.towers[VLM]
        FIGURES[f"{VLM} in-process"] = {"served_weight_bytes": server.weight_bytes(), "tower_bytes": repos.towers[VLM]}
        server.reset_counts()
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert hub.resolve_checkpoint(VLM) == path
        assert server.requests == []
    finally:
        server.stop()
    out = run_model(VLM, repos.pixels)
    assert max_diff(out, repos.reference, head=False) <= 1e-4
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub.resolve_checkpoint(VLM, local_files_only=True) == path
    assert hub.resolve_checkpoint(VLM) == path  # online but unreachable: falls back to the cache
    assert hub.resolve_checkpoint(VLM, revision=server.repos[VLM].sha, local_files_only=True) == path


def test_download_files_then_default_load_reuses_hf_cache(env: SimpleNamespace, repos: SimpleNamespace) -> None:
    """download="files" fills the plain HF cache with the shards holding the tower; later loads reuse it."""
    folder = repos.folders[VLM_SHARDED]
    path = hub.resolve_checkpoint(VLM_SHARDED, download="files")
    sha = env.server.repos[VLM_SHARDED].sha
    assert path == env.cache / "models--test-org--paligemma-tiny-sharded" / "snapshots" / sha
    needed = [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3)]
    assert env.server.weight_bytes() == sum((folder / n).stat().st_size for n in needed)
    assert not (path / "model-00004-of-00004.safetensors").exists()
    assert not own_repo_dir(env.cache, VLM_SHARDED).joinpath("snapshots").exists()
    assert scan_checkpoint(path).prefix == PREFIXES[VLM_SHARDED]

    env.server.reset_counts()
    assert hub.resolve_checkpoint(VLM_SHARDED) == path
    assert env.server.weight_bytes() == 0
    env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_checkpoint(VLM_SHARDED) == path


def test_snapshot_download_then_load_serves_no_weights(env: SimpleNamespace, repos: SimpleNamespace) -> None:
    """A repo a VLM server already downloaded (snapshot_download) loads from the HF cache, online and offline."""
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(VLM, cache_dir=env.cache, endpoint=env.server.endpoint))
    env.server.reset_counts()
    assert hub.resolve_checkpoint(VLM) == snapshot
    assert env.server.weight_bytes() == 0
    out = run_model(VLM, repos.pixels)
    assert max_diff(out, repos.reference, head=False) <= 1e-4
    env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_checkpoint(VLM) == snapshot


def test_revisions_and_explicit_prefix(env: SimpleNamespace, repos: SimpleNamespace) -> None:
    """A tag and a commit sha resolve to the same tower; an explicit prefix equal to the detected one shares it."""
    sha = env.server.repos[VLM].sha
    path = hub.resolve_checkpoint(VLM, revision="v1", prefix="vision_tower.vision_model.")
    assert path.name == sha
    assert (own_repo_dir(env.cache, VLM) / "refs" / "v1").read_text() == sha
    env.server.reset_counts()
    assert hub.resolve_checkpoint(VLM, revision=sha) == path
    assert hub.resolve_checkpoint(VLM) == path
    assert env.server.weight_bytes() == 0
    with pytest.raises(CheckpointError, match="does not name a vision tower"):
        hub.resolve_checkpoint(VLM_SHARDED, prefix="language_model.")


def test_environment_is_read_at_call_time(env: SimpleNamespace, tmp_path: Path) -> None:
    """HF_ENDPOINT / HF_HOME set after huggingface_hub was imported are honoured; cache_dir= wins over both."""
    import huggingface_hub.constants as constants

    default = "https://huggingface.co"
    env.monkeypatch.setattr(constants, "ENDPOINT", default)  # as if imported before HF_ENDPOINT was set
    env.monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", default + "/{repo_id}/resolve/{revision}/{filename}")
    env.monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "import-time-cache"))
    env.monkeypatch.delenv("HF_HUB_CACHE")
    env.monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.resolve_checkpoint(VISION).is_relative_to(tmp_path / "home" / "hub" / "tp-siglip")
    assert hub.resolve_checkpoint(VISION, cache_dir=tmp_path / "explicit").is_relative_to(tmp_path / "explicit" / "tp-siglip")
    assert not (tmp_path / "import-time-cache").exists()


def test_gated_repo_with_granted_token_loads(env: SimpleNamespace, repos: SimpleNamespace) -> None:
    path = hub.resolve_checkpoint(GATED, token=GRANTED_TOKEN)
    assert_same_tower(path, repos.folders[VISION], "")


# ----------------------------------------------------------------------------- local paths and arguments


def test_local_directories_still_work(env: SimpleNamespace, repos: SimpleNamespace, tmp_path: Path) -> None:
    folder = repos.folders[VISION]
    assert hub.resolve_checkpoint(str(folder)) == folder
    assert hub.resolve_checkpoint(folder) == folder
    local = tmp_path / "test-org" / "siglip-tiny"  # a directory that is also a valid repo id wins
    local.mkdir(parents=True)
    env.monkeypatch.chdir(tmp_path)
    assert hub.resolve_checkpoint(VISION) == Path(VISION)
    assert env.server.requests == []


@pytest.mark.parametrize("name", ["./no/such/dir", "/definitely/not/here", "not a repo", "a/b/c"])
def test_neither_directory_nor_repo_id(env: SimpleNamespace, name: str) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory exists, and it is not a valid Hub repo id"):
        hub.resolve_checkpoint(name)
    assert env.server.requests == []


def test_download_must_be_tower_or_files(env: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="download='everything'"):
        hub.resolve_checkpoint(VISION, download="everything")


# ----------------------------------------------------------------------------- errors


ERRORS = [  # huggingface_hub's error types by name: the module is imported in the tests, not at collection
    pytest.param("test-org/missing", {}, None, "RepositoryNotFoundError", "was not found", id="repo-not-found"),
    pytest.param(VISION, {"revision": "nope"}, None, "RevisionNotFoundError", "has no revision", id="revision-not-found"),
    pytest.param(GATED, {}, None, "GatedRepoError", "HTTP 401", id="gated-401"),
    pytest.param(GATED, {"token": "hf_not_granted"}, None, "GatedRepoError", "HTTP 403", id="gated-403"),
    pytest.param(VISION, {}, "offline", "LocalEntryNotFoundError", "HF_HUB_OFFLINE", id="offline-empty-cache"),
    pytest.param(VISION, {"local_files_only": True}, None, "LocalEntryNotFoundError", "local_files_only", id="local-only"),
    pytest.param(PICKLE, {}, None, "CheckpointError", "never unpickles", id="pickle-only"),
    pytest.param(NO_TOWER, {}, None, "CheckpointError", "no SigLIP vision tensors", id="no-tower"),
]


@pytest.mark.parametrize("repo_id, kwargs, mode, error_name, text", ERRORS)
def test_errors_name_repo_and_revision(
    env: SimpleNamespace,
    repos: SimpleNamespace,
    repo_id: str,
    kwargs: dict[str, Any],
    mode: Optional[str],
    error_name: str,
    text: str,
) -> None:
    import huggingface_hub.errors

    error = CheckpointError if error_name == "CheckpointError" else getattr(huggingface_hub.errors, error_name)
    if mode == "offline":
        env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(error) as info:
        hub.resolve_checkpoint(repo_id, **kwargs)
    assert type(info.value) is error
    message = str(info.value)
    assert text in message
    assert repr(repo_id) in message and repr(kwargs.get("revision", "main")) in message
    if repo_id == NO_TOWER:  # a single file without index: its header must be read to know, nothing more
        with open(repos.folders[repo_id] / "model.safetensors", "rb") as fh:
            header = 8 + int.from_bytes(fh.read(8), "little")
        assert env.server.weight_bytes() == header
    else:
        assert env.server.weight_bytes() == 0
    assert not (env.cache / "tp-siglip" / ("models--" + repo_id.replace("/", "--")) / "snapshots").exists()


def test_error_type_survives_from_pretrained(env: SimpleNamespace) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    from tp_siglip import SiglipVisionTransformer

    with pytest.raises(RepositoryNotFoundError, match="test-org/missing"):
        SiglipVisionTransformer.from_pretrained("test-org/missing")


# ----------------------------------------------------------------------------- interrupted transfers


class _Interrupt(KeyboardInterrupt):
    pass


def instant_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make huggingface_hub's retry waits (time.sleep in its backoff loop) instant; returns the waits asked for."""
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    return waits


def repeated_reads(server: HubServer) -> int:
    """How many ranged GETs of weight files repeat an earlier one (retries of the same bytes)."""
    ranged = [r for r in server.requests if r[0] == "GET" and r[2] is not None and r[1].endswith(".safetensors")]
    return len(ranged) - len(set(ranged))


@pytest.mark.parametrize("how", ["dropped-connections", "keyboard-interrupt"])
def test_interrupted_transfer_leaves_nothing_behind(
    env: SimpleNamespace, repos: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A failed fetch leaves no checkpoint (nor temporary directory, nor ref); the next load succeeds."""
    if how == "dropped-connections":
        # every ranged read of tensor data (not the small header reads): 2% of the bytes, then the connection drops
        env.server.fault = Fault("drop", fraction=0.02, data_only=True)
        waits = instant_backoff(monkeypatch)
        expected: type[BaseException] = hub.TransferError
    else:
        real = tower_cache._place
        calls = []

        def interrupting(*args: Any) -> None:
            calls.append(args)
            if len(calls) == 2:
                raise _Interrupt()
            real(*args)

        monkeypatch.setattr(tower_cache, "_place", interrupting)
        expected = _Interrupt
    with pytest.raises(expected) as info:
        hub.resolve_checkpoint(VLM_SHARDED)
    if how == "dropped-connections":
        assert repr(VLM_SHARDED) in str(info.value) and "'main'" in str(info.value)
        # retried by huggingface_hub (every wait was followed by the same request), then gave up
        assert len(waits) >= 2 and repeated_reads(env.server) == len(waits)
    own = own_repo_dir(env.cache, VLM_SHARDED)
    assert list((own / "snapshots").iterdir()) == []
    assert not (own / "refs").exists()

    env.server.fault = None
    monkeypatch.undo()  # also undoes point_hf_at: aim at the server again
    point_hf_at(monkeypatch, env.server.endpoint, env.cache)
    path = hub.resolve_checkpoint(VLM_SHARDED)
    assert_same_tower(path, repos.folders[VLM_SHARDED], PREFIXES[VLM_SHARDED])


@pytest.mark.parametrize("damage", ["truncated", "header", "config", "manifest"])
def test_damaged_tower_cache_is_named_and_fetched_again(
    env: SimpleNamespace, repos: SimpleNamespace, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """A damaged cached tower (same size included) is never loaded: the warning names its folder and what is wrong,
    and says that a load with network access fetches it again; offline, nothing usable is cached."""
    path = hub.resolve_checkpoint(VISION)
    weights = path / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-8])
    elif damage == "header":  # same size
        weights.write_bytes(weights.read_bytes()[:8] + b"X" + weights.read_bytes()[9:])
    else:
        (path / ("config.json" if damage == "config" else tower_cache.MANIFEST_FILE)).write_text("{oops")
    env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="no cached copy"):  # LocalEntryNotFoundError
        hub.resolve_checkpoint(VISION)
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert warned and str(path) in warned[0] and "fetches it again" in warned[0], warned
    what = {"truncated": "bytes", "header": "header", "config": "config.json", "manifest": "tp_siglip_tower.json"}[damage]
    assert what in warned[0], warned
    env.monkeypatch.delenv("HF_HUB_OFFLINE")
    env.server.reset_counts()
    assert hub.resolve_checkpoint(VISION) == path and env.server.weight_bytes() > 0
    assert_same_tower(path, repos.folders[VISION], PREFIXES[VISION])


FAULTS = [Fault("drop", remaining=2, data_only=True), Fault("short")]


@pytest.mark.parametrize("fault", FAULTS, ids=["dropped-twice", "short-ranges"])
def test_transfer_resumes_after_drops_and_short_ranges(
    env: SimpleNamespace, repos: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, fault: Fault
) -> None:
    """A dropped connection is retried; a shorter range than asked is continued: the tower arrives whole.

    What a dropped request had received is lost (huggingface_hub resends the request), so the tower is read
    in chunks of 1/128 of it: two drops cost at most one chunk, and the total stays within BYTES_FACTOR.
    """
    instant_backoff(monkeypatch)
    env.server.fault = fault
    path = hub.resolve_checkpoint(VLM)
    assert_same_tower(path, repos.folders[VLM], PREFIXES[VLM])
    served = env.server.weight_bytes()
    assert served <= BYTES_FACTOR * repos.towers[VLM]
    assert fault.remaining in (0, None)
    assert repeated_reads(env.server) == (2 if fault.mode == "drop" else 0)
    FIGURES[f"{VLM} {fault.mode}"] = {"served_weight_bytes": served, "tower_bytes": repos.towers[VLM]}


def test_vlm_repos_dwarf_their_tower_and_report_figures(repos: SimpleNamespace) -> None:
    """The VLM test repos are what the byte figures need: a tower < 10% of the repo. Prints the figures (-s)."""
    for repo in PARITY_REPOS:
        repo_bytes = sum(p.stat().st_size for p in repos.folders[repo].glob("*.safetensors"))
        print(f"{repo}: tower {repos.towers[repo]} B, repo safetensors {repo_bytes} B")
        if repo in (VLM, VLM_SHARDED):
            assert repos.towers[repo] < 0.10 * repo_bytes
    for name, figure in FIGURES.items():
        served, tower = figure["served_weight_bytes"], figure["tower_bytes"]
        print(f"{name}: served {served} B = {served / tower:.4f} x tower")
