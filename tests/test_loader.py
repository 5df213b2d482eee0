"""The local loader on one rank: features (early exit, head off, prefix, dtype) and every refusal."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from tp_siglip import SiglipVisionTransformer, loader
from tp_siglip.loader import CheckpointError

from checkpoints import TINY, save_layout, tower_state


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    return (*tiny_checkpoint, tmp_path_factory.mktemp("loader"))


@pytest.fixture
def copy(tiny, tmp_path):
    """A scratch copy of the tiny checkpoint that a test may damage."""
    target = tmp_path / "ckpt"
    shutil.copytree(tiny[1], target)
    return target


def _pixels(batch=2):
    return torch.randn(batch, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(3))


def test_loads_on_meta_without_random_init(tiny, monkeypatch):
    reference, ckpt, _ = tiny
    calls = []
    monkeypatch.setattr(SiglipVisionTransformer, "init_weights", lambda self, seed=0: calls.append(seed))
    model = SiglipVisionTransformer.from_pretrained(ckpt)
    assert calls == [] and not model.training and model.device == torch.device("cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(_pixels()).pooler_output, reference(_pixels()).pooler_output, atol=1e-4, rtol=0)


def test_from_pretrained_on_meta_is_an_unloaded_skeleton(tiny):
    """device="meta" checks the checkpoint and builds the skeleton, but no weights land on meta: the model
    must refuse to run (it ran and returned meta tensors) until load_weights fills it."""
    reference, ckpt, _ = tiny
    model = SiglipVisionTransformer.from_pretrained(ckpt, device="meta")
    assert model.is_meta
    with pytest.raises(RuntimeError, match="not loaded"):
        model(_pixels().to("meta"))
    model.load_weights(tower_state(reference).items(), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(_pixels()).pooler_output, reference(_pixels()).pooler_output, atol=1e-4, rtol=0)


def test_early_exit_matches_hidden_state_k_and_skips_reading_later_layers(tiny, monkeypatch):
    reference, ckpt, _ = tiny
    read = []
    real = loader.copy_piece

    def spy(target, piece, source):
        read.append(piece.source)
        return real(target, piece, source)

    monkeypatch.setattr(loader, "copy_piece", spy)
    model = SiglipVisionTransformer.from_pretrained(ckpt, num_hidden_layers=1, use_head=False)
    with torch.no_grad():
        ours = model(_pixels(), output_hidden_states=True)
        theirs = reference(_pixels(), output_hidden_states=True)
    assert len(model.encoder.layers) == 1 and ours.pooler_output is None
    assert len(ours.hidden_states) == 2
    torch.testing.assert_close(ours.hidden_states[-1], theirs.hidden_states[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.last_hidden_state, reference.post_layernorm(theirs.hidden_states[1]), atol=1e-5, rtol=0)
    assert set(read) == set(model.state_dict())  # every tensor the model holds was read ...
    assert not [name for name in read if name.startswith(("encoder.layers.1.", "encoder.layers.2.", "head."))]


def test_early_exit_out_of_range(tiny):
    with pytest.raises(ValueError, match="num_hidden_layers=9.*only 3"):
        SiglipVisionTransformer.from_pretrained(tiny[1], num_hidden_layers=9)
    with pytest.raises(ValueError, match="num_hidden_layers must be >= 1, got 0"):
        SiglipVisionTransformer.from_pretrained(tiny[1], num_hidden_layers=0)


def test_unavailable_gpu_is_a_value_error_naming_the_fix(tiny, monkeypatch):
    """device="cuda" without CUDA was torch's AssertionError from deep inside the load."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available.*device='cpu'"):
        SiglipVisionTransformer.from_pretrained(tiny[1], device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="device 'cuda:2': only 2 GPU"):
        SiglipVisionTransformer.from_pretrained(tiny[1], device="cuda:2")


def test_explicit_prefix_and_dtypes(tiny, tmp_path):
    reference, _, root = tiny
    ckpt = save_layout(reference, "v4_vision", tmp_path / "v4")
    model = SiglipVisionTransformer.from_pretrained(ckpt, prefix="vision_model.", dtype="bf16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="prefix='nope.'"):
        SiglipVisionTransformer.from_pretrained(ckpt, prefix="nope.")
    with pytest.raises(CheckpointError, match=r"prefix='vision_model' .*tower prefixes are \['vision_model.'\]"):
        SiglipVisionTransformer.from_pretrained(ckpt, prefix="vision_model")  # the dot forgotten: the message says
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    save_file(tensors, str(ckpt / "model.safetensors"))
    assert SiglipVisionTransformer.from_pretrained(ckpt).dtype == torch.bfloat16  # as stored
    assert SiglipVisionTransformer.from_pretrained(ckpt, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("dtype, error", [("float33", ValueError), (torch.int8, ValueError), (3, TypeError)])
def test_bad_dtype(tiny, dtype, error):
    with pytest.raises(error, match=str(dtype).replace(".", r"\.")):
        SiglipVisionTransformer.from_pretrained(tiny[1], dtype=dtype)


def test_world_size_arguments(tiny, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        SiglipVisionTransformer.from_pretrained(tiny[1], world_size=0)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2"):
        SiglipVisionTransformer.from_pretrained(tiny[1], world_size=2)
    with pytest.raises(TypeError, match="world_size must be an int"):
        SiglipVisionTransformer.from_pretrained(tiny[1], world_size="2")


def test_missing_path_and_file_path(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        SiglipVisionTransformer.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="is a file"):
        SiglipVisionTransformer.from_pretrained(tiny[1] / "model.safetensors")


def test_pickle_only_is_refused_unopened(copy):
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"this would be a pickle")
    with pytest.raises(CheckpointError, match="(?s)pytorch_model.bin.*never unpickles"):
        SiglipVisionTransformer.from_pretrained(copy)


def test_truncated_file_names_the_file(copy):
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        SiglipVisionTransformer.from_pretrained(copy)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="model.safetensors.*too short"):
        SiglipVisionTransformer.from_pretrained(copy)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["embeddings.patch_embedding.bias"].update(data_offsets=[0, 10**12]), "data_offsets|ends at byte"),
        (lambda h: h["embeddings.patch_embedding.bias"].update(shape=[10**9, 10**9]), "inconsistent"),
        (lambda h: h["embeddings.patch_embedding.bias"].update(shape=[-1]), "invalid shape"),
        (lambda h: h["embeddings.patch_embedding.bias"].update(dtype="F128"), "unsupported dtype"),
        (lambda h: h["embeddings.patch_embedding.bias"].update(data_offsets=[8, 8 + 96 * 4]), "overlap"),
    ],
)
def test_lying_headers_are_rejected(copy, edit, message):
    _rewrite_header(copy / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        SiglipVisionTransformer.from_pretrained(copy)


def test_absurd_header_length(copy):
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    with pytest.raises(CheckpointError, match="announces a .*-byte header"):
        SiglipVisionTransformer.from_pretrained(copy)


def _edit_tensors(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_unexpected_and_misshapen_tensors_are_named(copy):
    path = copy / "model.safetensors"
    _edit_tensors(path, lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match="missing tensors.*encoder.layers.1.mlp.fc2.bias"):
        SiglipVisionTransformer.from_pretrained(copy)
    _edit_tensors(path, lambda t: t.update({"encoder.layers.1.mlp.fc2.bias": torch.zeros(95)}))
    with pytest.raises(CheckpointError, match=r"encoder.layers.1.mlp.fc2.bias: checkpoint \[95\] vs model \[96\]"):
        SiglipVisionTransformer.from_pretrained(copy)
    _edit_tensors(path, lambda t: t.update({"encoder.layers.1.mlp.fc2.bias": torch.zeros(96), "encoder.layers.1.mlp.fc3.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensors.*encoder.layers.1.mlp.fc3.weight"):
        SiglipVisionTransformer.from_pretrained(copy)


def test_head_missing_suggests_use_head_false(copy):
    _edit_tensors(copy / "model.safetensors", lambda t: [t.pop(k) for k in list(t) if k.startswith("head.")])
    with pytest.raises(CheckpointError, match="use_head=False"):
        SiglipVisionTransformer.from_pretrained(copy)
    assert SiglipVisionTransformer.from_pretrained(copy, use_head=False).head is None


def test_load_weights_not_strict_with_a_misshapen_tensor_refuses_to_run(tiny):
    """strict=False reports a wrong shape; the tensor was not copied, so the model must not run on empty memory."""
    reference, _, _ = tiny
    state = {**tower_state(reference), "post_layernorm.weight": torch.ones(5)}
    model = SiglipVisionTransformer(SiglipVisionTransformer.from_pretrained(tiny[1]).config, device="meta")
    report = model.load_weights(state.items(), strict=False)
    assert report.wrong_shapes == ["post_layernorm.weight: given [5] vs model [96]"] and not report.missing
    with pytest.raises(RuntimeError, match="not loaded"):
        model(_pixels())


def test_load_weights_finds_colpalis_prefix_and_names_the_fix_for_others(tiny):
    """ColPali's ``vlm.vision_tower.`` (a supported layout) is a known prefix; names under an unknown one say to
    pass prefix=, not that the checkpoint lacks a pooling head."""
    reference, ckpt, _ = tiny
    state = tower_state(reference)
    config = SiglipVisionTransformer.from_pretrained(ckpt).config
    model = SiglipVisionTransformer(config, device="meta")
    report = model.load_weights((f"vlm.vision_tower.{k}", v) for k, v in state.items())
    assert report.prefix == "vlm.vision_tower." and len(report.loaded) == len(state)
    with torch.no_grad():
        torch.testing.assert_close(model(_pixels()).pooler_output, reference(_pixels()).pooler_output, atol=1e-4, rtol=0)
    with pytest.raises(CheckpointError, match="no name is a tower tensor under a known prefix.*pass prefix=") as err:
        SiglipVisionTransformer(config, device="meta").load_weights((f"visual.{k}", v) for k, v in state.items())
    assert "use_head" not in str(err.value)
    report = SiglipVisionTransformer(config, device="meta").load_weights(state.items(), prefix="x.", strict=False)
    assert not report.loaded and "use_head" not in report.problems()[0]


def test_not_a_siglip_checkpoint(copy):
    _edit_tensors(copy / "model.safetensors", lambda t: t.update({"x.weight": t.pop("embeddings.patch_embedding.weight")}))
    with pytest.raises(CheckpointError, match="no SigLIP vision tensors"):
        SiglipVisionTransformer.from_pretrained(copy)


def test_missing_config_and_missing_shard(tiny, tmp_path):
    reference, ckpt, _ = tiny
    sharded = save_layout(reference, "sharded", tmp_path / "sharded")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard .*{shard.name}.* is missing"):
        SiglipVisionTransformer.from_pretrained(sharded)
    (sharded / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        SiglipVisionTransformer.from_pretrained(sharded)


def test_code_in_a_repo_is_never_executed(copy, tmp_path):
    """A repo that ships Python (remote-code style auto_map) loads as plain tensors; its code never runs."""
    marker = tmp_path / "executed"
    (copy / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (copy / "config.json").write_text(json.dumps(config))
    model = SiglipVisionTransformer.from_pretrained(copy)
    assert model.head is not None and not marker.exists()


@pytest.mark.parametrize("prefix", ["vision_tower.vision_model.", "model.vision_tower.vision_model.", "model.vision_model."])
def test_vlm_prefixes_and_head_decided_by_the_checkpoint(tiny, tmp_path, prefix):
    """A LLaVA-style repo: the tower under a VLM prefix next to language-model tensors, the vision config
    nested without vision_use_head and no head tensors -> loaded headless, equal to transformers."""
    reference, ckpt, _ = tiny
    tensors = {prefix + k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if not k.startswith("head.")}
    tensors["model.language_model.embed_tokens.weight"] = torch.zeros(4, 8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    vision = {k: v for k, v in json.loads((ckpt / "config.json").read_text()).items() if k != "vision_use_head"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": vision}))
    model = SiglipVisionTransformer.from_pretrained(tmp_path)
    assert model.head is None
    with torch.no_grad():
        torch.testing.assert_close(model(_pixels()).last_hidden_state, reference(_pixels()).last_hidden_state,
                                   atol=1e-4, rtol=0)


def _state_dict_round_trip(rank, world_size, ckpt):
    import torch.distributed as dist

    model = SiglipVisionTransformer.from_pretrained(ckpt, world_size=world_size)
    state = model.state_dict()
    other = SiglipVisionTransformer(model.config, process_group=dist.group.WORLD, seed=1)
    other.load_state_dict(state)  # strict: every key used, none missing
    return {"state": state, "same": all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())}


def test_state_dict_speaks_transformers_names_and_round_trips(tiny, tmp_path):
    """One rank: state_dict() equals transformers' (names, shapes, values); at 2 ranks each rank's entries
    are its slices (q/k/v rows of its heads, in_proj's three thirds together) and load back exactly."""
    reference, ckpt, _ = tiny
    model = SiglipVisionTransformer.from_pretrained(ckpt)
    ours, theirs = model.state_dict(), tower_state(reference)
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name
    fresh = SiglipVisionTransformer(model.config, seed=3)
    fresh.load_state_dict(ours)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in ours.items())
    from distributed import run_ranks

    dim, heads = TINY["hidden_size"], TINY["num_attention_heads"]
    for rank, out in enumerate(run_ranks(2, tmp_path, _state_dict_round_trip, str(ckpt))):
        assert out["same"]
        rows = slice(rank * dim // 2, (rank + 1) * dim // 2)
        state = out["state"]
        assert torch.equal(state["encoder.layers.0.self_attn.k_proj.weight"], theirs["encoder.layers.0.self_attn.k_proj.weight"][rows])
        thirds = theirs["head.attention.in_proj_weight"].split(dim)
        assert torch.equal(state["head.attention.in_proj_weight"], torch.cat([t[rows] for t in thirds]))
        assert heads % 2 == 0
