"""timm, open_clip and big_vision checkpoints, against the libraries themselves (tests/oracles.py).

Towers are made by timm's and open_clip's own ``create_model`` and saved as their Hub repos are; big_vision
``.npz`` files are written from a timm model, per layer and scan-stacked (float16), and checked with timm's
own npz reader. Each format is loaded by ``SiglipVisionTransformer.from_pretrained`` at 1-4 ranks (8 heads:
3 ranks hold 3/3/2) and compared with timm's ``forward_features`` / ``forward_head(..., pre_logits=True)`` or
open_clip's ``encode_image``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tp_siglip import SiglipVisionTransformer, preprocess
from tp_siglip.loader import CheckpointError

import oracles

WORLD_SIZES = (1, 2, 3, 4)
TOLERANCE = 1e-4
FORMATS = ("timm", "timm_gap", "open_clip", "npz_layers", "npz_stacked")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One checkpoint per format, the inputs, and each library's outputs on them."""
    root = tmp_path_factory.mktemp("formats")
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    timm_map, timm_gap = oracles.timm_model(oracles.MAP_ARCH, 1), oracles.timm_model(oracles.GAP_ARCH, 2)
    clip = oracles.open_clip_model(3, root)
    # big_vision runs tanh GELU: the npz files come from (and are read back into) a timm tower built with it
    tanh = oracles.timm_model(oracles.MAP_ARCH, 4, act_layer="gelu_tanh")
    layers = oracles.write_npz(tanh, root / "layers.npz", stacked=False)
    stacked = oracles.write_npz(tanh, root / "stacked.npz", stacked=True, dtype=np.float16)
    from_npz = {name: oracles.timm_from_npz(oracles.MAP_ARCH, path, act_layer="gelu_tanh")
                for name, path in (("npz_layers", layers), ("npz_stacked", stacked))}
    with torch.no_grad():
        clip_ref = {"last_hidden_state": clip.visual.trunk.forward_features(pixels), "pooler_output": clip.encode_image(pixels)}
    paths = {"timm": oracles.save_timm(timm_map, root / "timm"), "timm_gap": oracles.save_timm(timm_gap, root / "timm_gap"),
             "open_clip": oracles.save_open_clip(clip, root / "open_clip"), "npz_layers": layers, "npz_stacked": stacked}
    refs = {"timm": oracles.timm_outputs(timm_map, pixels), "timm_gap": oracles.timm_outputs(timm_gap, pixels),
            "open_clip": clip_ref, **{k: oracles.timm_outputs(m, pixels) for k, m in from_npz.items()}}
    models = {"timm": timm_map, "timm_gap": timm_gap, "tanh": tanh, **from_npz}
    return SimpleNamespace(root=root, pixels=pixels, paths=paths, refs=refs, models=models, clip=clip)


def _worker(rank: int, world_size: int, paths: dict, pixels: torch.Tensor) -> dict:
    from tp_siglip.formats import register_timm_architecture

    register_timm_architecture(oracles.TRUNK, **oracles.TRUNK_ARGS)  # open_clip's test-only trunk
    out = {}
    for name, path in paths.items():
        model = SiglipVisionTransformer.from_pretrained(path, world_size=world_size, dtype="float32")
        with torch.inference_mode():
            result = model(pixels)
        out[name] = {"last_hidden_state": result.last_hidden_state, "pooler_output": result.pooler_output,
                     "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    return out


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda ws: f"ws{ws}")
def ranks(request: pytest.FixtureRequest, made: SimpleNamespace, rank_pools) -> tuple[int, list[dict]]:
    ws = request.param
    return ws, rank_pools[1](ws).run(_worker, {k: str(v) for k, v in made.paths.items()}, made.pixels, timeout=300)


@pytest.mark.parametrize("fmt", FORMATS)
def test_parity_with_the_library(ranks, made, fmt) -> None:
    """Every rank's pooler_output and last_hidden_state within 1e-4 of timm's / open_clip's, in fp32."""
    ws, per_rank = ranks
    for out in per_rank:
        for key in ("last_hidden_state", "pooler_output"):
            diff = (out[fmt][key] - made.refs[fmt][key]).abs().max().item()
            assert diff <= TOLERANCE, (fmt, ws, key, diff)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_rank_holds_its_share(ranks, made, fmt) -> None:
    """At 2 ranks each rank holds <= 0.55x of the tower's parameter bytes (the rest: replicated embeddings and
    norms); at 1 rank all of them, at 3 and 4 less than at 2."""
    ws, per_rank = ranks
    whole = sum(p.numel() * 4 for p in SiglipVisionTransformer.from_pretrained(made.paths[fmt], dtype="float32").parameters())
    shares = [out[fmt]["param_bytes"] / whole for out in per_rank]
    bound = {1: 1.0, 2: 0.55}.get(ws, 0.5)
    assert all(share <= bound for share in shares) and (ws > 1 or shares == [1.0]), (ws, shares)


def test_open_clip_folder_reads_only_the_trunk(made, monkeypatch) -> None:
    """From a local open_clip folder, every tensor read is under ``visual.trunk.``: the text tower beside it in
    ``open_clip_model.safetensors`` is never opened."""
    import tp_siglip.formats as formats

    real, opened = formats.safe_open, []

    class Spy:
        def __init__(self, *args, **kwargs) -> None:
            self.inner = real(*args, **kwargs)

        def __enter__(self) -> Spy:
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self.inner.__exit__(*exc)

        def get_slice(self, key: str):
            opened.append(key)
            return self.handle.get_slice(key)

    monkeypatch.setattr(formats, "safe_open", Spy)
    SiglipVisionTransformer.from_pretrained(made.paths["open_clip"])
    assert opened and all(key.startswith("visual.trunk.") for key in opened), opened


def test_npz_image_size_is_the_multiple_of_32_that_gives_its_grid() -> None:
    """webli_en_so400m_384.npz has a 27 x 27 grid of 14 px patches: 384 px, as transformers' converted model
    says (the conv drops 6 px), not 378; a grid no multiple of 32 gives keeps grid x patch."""
    from tp_siglip.npz import _image_size

    sizes = [_image_size(side, patch) for side, patch in ((27, 14), (16, 14), (16, 16), (24, 16), (64, 14), (4, 4), (3, 14))]
    assert sizes == [384, 224, 256, 384, 896, 16, 42]


@pytest.mark.parametrize("name", ["npz_layers", "npz_stacked"])
def test_npz_writer_is_what_timm_reads(made, name) -> None:
    """timm's own big_vision reader (``_load_weights``) gives back the model the .npz was written from (float16
    rounding in the stacked file), so the .npz files follow big_vision's layout."""
    source = made.models["tanh"].state_dict()
    read = made.models[name].state_dict()
    assert sorted(read) == sorted(source)
    for key, value in source.items():
        expected = value.half().float() if name == "npz_stacked" else value
        assert torch.equal(read[key], expected), key


def test_activation_follows_the_library_and_can_be_overridden(made) -> None:
    """timm runs exact GELU, big_vision tanh; they differ by more than 1e-4, and each default gives its library's numbers."""
    timm_tower = SiglipVisionTransformer.from_pretrained(made.paths["timm"])
    swapped = SiglipVisionTransformer.from_pretrained(made.paths["timm"], hidden_act="gelu_pytorch_tanh")
    npz_tower = SiglipVisionTransformer.from_pretrained(made.paths["npz_layers"])
    assert (timm_tower.config.hidden_act, swapped.config.hidden_act, npz_tower.config.hidden_act) == (
        "gelu", "gelu_pytorch_tanh", "gelu_pytorch_tanh")
    with torch.no_grad():
        ref = made.refs["timm"]["last_hidden_state"]
        assert (timm_tower(made.pixels).last_hidden_state - ref).abs().max() <= TOLERANCE
        assert (swapped(made.pixels).last_hidden_state - ref).abs().max() > 2 * TOLERANCE
    with pytest.raises(ValueError, match="hidden_act 'gelu_erf' is not supported"):
        SiglipVisionTransformer.from_pretrained(made.paths["timm"], hidden_act="gelu_erf")


def test_gap_pooling_and_its_override(made) -> None:
    """A ``_gap_`` tower's pooled output is the token mean; ``global_pool="avg"`` asks for it on a headed tower."""
    gap = SiglipVisionTransformer.from_pretrained(made.paths["timm_gap"])
    assert gap.config.global_pool == "avg" and gap.head is None
    avg = SiglipVisionTransformer.from_pretrained(made.paths["npz_layers"], global_pool="avg")
    with torch.no_grad():
        out = avg(made.pixels)
    assert avg.head is None and torch.allclose(out.pooler_output, out.last_hidden_state.mean(1))
    with pytest.raises(ValueError, match="global_pool='map' but the tower has no pooling head"):
        SiglipVisionTransformer.from_pretrained(made.paths["timm_gap"], global_pool="map")


def test_state_dict_has_transformers_names(made) -> None:
    """``state_dict()`` of a timm tower loads strictly into transformers' SiglipVisionModel, which then gives timm's
    numbers; ``load_weights`` takes it back."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    ours = SiglipVisionTransformer.from_pretrained(made.paths["timm"])
    state = ours.state_dict()
    config = {k: v for k, v in ours.config.to_dict().items() if k not in ("variant", "global_pool", "preprocessing", "num_patches")}
    reference = SiglipVisionModel(SiglipVisionConfig(**config)).eval()
    nested = next(iter(reference.state_dict())).startswith("vision_model.")  # transformers 4.x
    reference.load_state_dict({("vision_model." if nested else "") + k: v for k, v in state.items()}, strict=True)
    again = SiglipVisionTransformer(ours.config, device="meta")
    assert not again.load_weights(state.items()).problems()
    with torch.no_grad():
        assert (reference(pixel_values=made.pixels).pooler_output - made.refs["timm"]["pooler_output"]).abs().max() <= TOLERANCE
        assert torch.equal(again(made.pixels).pooler_output, ours(made.pixels).pooler_output)


def test_architectures_match_timms_registry() -> None:
    """Every architecture tp-siglip knows is built by timm (on the meta device) with the same geometry,
    activation and pooling."""
    import timm

    from tp_siglip.timm_format import TIMM_ARCHITECTURES, timm_config

    for name in TIMM_ARCHITECTURES:
        if name == oracles.TRUNK:
            continue
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        ours = timm_config(name, {}, None, name)
        block = model.blocks[0]
        probe = torch.linspace(-3, 3, 61)  # the activation, told apart by what it computes
        gelu = {"gelu": torch.nn.functional.gelu(probe), "gelu_pytorch_tanh": torch.nn.functional.gelu(probe, approximate="tanh")}
        act = next(name for name, values in gelu.items() if torch.equal(type(block.mlp.act)()(probe), values))
        theirs = dict(hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks), num_attention_heads=block.attn.num_heads,
                      intermediate_size=block.mlp.fc1.out_features, patch_size=model.patch_embed.patch_size[0],
                      image_size=model.patch_embed.img_size[0], hidden_act=act, layer_norm_eps=model.norm.eps,
                      global_pool=model.global_pool)
        assert {k: ours[k] for k in theirs} == theirs, name


def test_preprocessing_is_the_librarys_bit_for_bit(made) -> None:
    """``preprocess(..., preprocessing=model.config.preprocessing)`` equals timm's ``create_transform`` and open_clip's
    ``image_transform_v2`` outputs exactly, for every resize mode, crop_pct and odd image sizes."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from tp_siglip.timm_format import open_clip_config, timm_preprocessing

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 61), (61, 50), (9, 30), (24, 24))]
    images.append(images[0].convert("L"))
    stats = {"mean": (0.4, 0.5, 0.6), "std": (0.2, 0.3, 0.25)}
    for mode, pct, interpolation in [("center", 0.875, "bicubic"), ("center", 1.0, "bilinear"), ("squash", 0.9, "bicubic"),
                                     ("border", 1.0, "bicubic")]:
        cfg = {"input_size": (3, 24, 24), "crop_pct": pct, "crop_mode": mode, "interpolation": interpolation, **stats}
        theirs = create_transform(**resolve_data_config(cfg), is_training=False)
        ours = timm_preprocessing(cfg, 24, "test")
        for image in images:
            assert torch.equal(preprocess(image, 24, preprocessing=ours)[0], theirs(image.convert("RGB"))), (mode, pct, image.size)
    for mode in ("squash", "shortest", "longest"):
        pre = {"interpolation": "bicubic", "resize_mode": mode, "fill_color": 7, **stats}
        vision = {"timm_model_name": oracles.MAP_ARCH, "timm_proj": "none", "timm_pool": "map", "image_size": 224}
        ours = open_clip_config({"model_cfg": {"vision_cfg": vision}, "preprocess_cfg": pre}, "test")[1]
        theirs = image_transform_v2(PreprocessCfg(size=224, **pre), is_train=False)
        for image in images:
            assert torch.equal(preprocess(image, 224, preprocessing=ours)[0], theirs(image)), (mode, image.size)
    loaded = SiglipVisionTransformer.from_pretrained(made.paths["open_clip"]).config.preprocessing
    assert (loaded.library, loaded.resize, loaded.mean) == ("open_clip", "squash", (0.5, 0.5, 0.5))


@pytest.mark.parametrize("fmt", ["timm", "open_clip"])
def test_encode_job_matches_the_library(made, tmp_path, capsys, fmt) -> None:
    """``tp-siglip encode --model <folder>`` on the bundled photos equals the library's own pipeline (its
    transform for the checkpoint, then its forward), both L2-normalised."""
    import open_clip
    import timm
    from PIL import Image
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_data_config

    from tp_siglip import encode

    output = tmp_path / "emb.safetensors"
    assert encode.main([str(REPO / "src/tp_siglip/images"), "--model", str(made.paths[fmt]), "--output", str(output)]) == 0
    capsys.readouterr()
    ours = load_file(str(output))["pooler_output"]
    photos = sorted(p for p in (REPO / "src/tp_siglip/images").iterdir() if p.suffix in (".jpg", ".png"))
    with torch.no_grad():
        if fmt == "timm":
            model = timm.create_model(f"local-dir:{made.paths[fmt]}", pretrained=True).eval()
            transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
            pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
            theirs = model.forward_head(model.forward_features(pixels), pre_logits=True)
        else:
            model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{made.paths[fmt]}")
            theirs = model.eval().encode_image(torch.stack([transform(Image.open(p)) for p in photos]))
    normalised = [torch.nn.functional.normalize(x, dim=-1) for x in (ours, theirs)]
    assert (normalised[0] - normalised[1]).abs().max() <= TOLERANCE


def test_refusals_name_the_problem_and_the_fix(made, tmp_path) -> None:
    """Pickles (naming the safetensors file of the same repo), projections open_clip adds, unknown trunks,
    class tokens and object arrays are refused before any weight is read."""
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(made.paths["open_clip"] / "open_clip_config.json", pickled)
    (pickled / "open_clip_pytorch_model.bin").write_bytes(b"never opened")
    for path in (pickled, pickled / "open_clip_pytorch_model.bin"):
        with pytest.raises(CheckpointError, match="(?s)never unpickles.*open_clip_model.safetensors"):
            SiglipVisionTransformer.from_pretrained(path)

    def edited(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(made.paths["open_clip" if name.startswith("oc") else "timm"], folder)
        config = folder / ("open_clip_config.json" if name.startswith("oc") else "config.json")
        data = json.loads(config.read_text())
        change(data)
        config.write_text(json.dumps(data))
        return folder

    cases = [
        (edited("oc-proj", lambda d: d["model_cfg"]["vision_cfg"].update(timm_proj="linear")), "timm_proj 'linear'"),
        (edited("oc-trunk", lambda d: d["model_cfg"]["vision_cfg"].update(timm_model_name="vit_mystery")),
         "'vit_mystery' is not one of timm's SigLIP ViTs.*register_timm_architecture"),
        (edited("timm-cls", lambda d: d["model_args"].update(class_token=True)), "class_token=True"),
        (edited("timm-heads", lambda d: d["model_args"].update(num_heads=4)), None),
    ]
    for folder, message in cases[:3]:
        with pytest.raises(CheckpointError, match=message):
            SiglipVisionTransformer.from_pretrained(folder)
    # 4 heads instead of 8 cannot be seen in timm's fused qkv: it loads, and differs from timm (so the config is read)
    with torch.no_grad():
        wrong = SiglipVisionTransformer.from_pretrained(cases[3][0])(made.pixels).pooler_output
    assert (wrong - made.refs["timm"]["pooler_output"]).abs().max() > 10 * TOLERANCE

    bad = tmp_path / "objects.npz"
    np.savez(bad, **{"params/img/embedding/kernel": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="holds Python objects.*never unpickles"):
        SiglipVisionTransformer.from_pretrained(bad)
