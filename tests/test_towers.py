"""Towers beyond plain SigLIP, loaded with the default call: SigLIP2 NaFlex (alone and inside Siglip2Model),
Idefics3 / SmolVLM (``model.vision_model.``, no head, padded images), ColPali (config nested two deep) and
the SigLIP towers of Gemma3, LLaVA-OneVision and LLaVA as transformers 5 saves them (``vision_tower.``).

Parity with transformers' own vision module on the same weights (fp32, <= 1e-4) at world sizes 1-4 in
tensor mode, and at 2 and 3 ranks in data mode, on batches that mix image sizes and aspect ratios. One
spawn per set-up runs every tower; each rank returns its outputs.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tp_siglip import Siglip2VisionTransformer, SiglipVisionTransformer
from tp_siglip.loader import CheckpointError

import towers
from distributed import run_ranks

NAFLEX_SHAPES = [(4, 6), (2, 3), (1, 5), (3, 3), (6, 4)]  # padded to 24 patches; the table is 4x4
NAFLEX_LENGTH = 24


def _naflex_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(NAFLEX_SHAPES, dtype=torch.long)
    counts = shapes.prod(1)
    mask = (torch.arange(NAFLEX_LENGTH)[None, :] < counts[:, None]).to(torch.int32)
    pixels = torch.randn(len(NAFLEX_SHAPES), NAFLEX_LENGTH, 3 * 8 * 8, generator=gen) * mask[..., None]
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def _idefics3_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three 40x40 images (5x5 patches): one full, two padded to 3x4 and 5x2 real patches."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(3, 5, 5, dtype=torch.bool)
    mask[0] = True
    mask[1, :3, :4] = True
    mask[2, :, :2] = True
    pixels = torch.randn(3, 3, 40, 40, generator=gen) * mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    return {"pixel_values": pixels, "patch_attention_mask": mask}


def _outputs(out, head: bool) -> dict[str, torch.Tensor]:
    result = {"last_hidden_state": out.last_hidden_state}
    result.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
    if head:
        result["pooler_output"] = out.pooler_output
    return result


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Every tower saved by transformers, the inputs, and transformers' outputs on them."""
    root = tmp_path_factory.mktemp("towers")
    jobs, refs = [], {}
    for name, builder in towers.BUILDERS.items():
        model, directory = builder(root / name)
        tower = towers.vision_tower(model)
        if name.startswith("siglip2"):
            inputs, head = _naflex_inputs(), True
        elif name in ("colpali", "gemma3", "llava_onevision", "llava"):
            inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))}
            head = name == "llava"
        else:
            inputs, head = _idefics3_inputs(), False
        with torch.no_grad():
            refs[name] = _outputs(tower(**inputs, output_hidden_states=True), head)
            if name == "idefics3":  # no mask: transformers still bucketizes the positions of the full grid
                job = {"pixel_values": inputs["pixel_values"]}
                refs["idefics3-nomask"] = _outputs(tower(**job, output_hidden_states=True), False)
                jobs.append(("idefics3-nomask", str(directory), job))
        jobs.append((name, str(directory), inputs))
    return root, jobs, refs


def _split_plan(batch: int, world_size: int) -> list[int]:
    """Uneven row counts for a split batch, with an empty rank in the middle from 3 ranks on."""
    sizes = [0] * world_size
    sizes[0], sizes[-1] = batch - batch // 2, batch // 2
    return sizes


def _encode_towers(rank: int, world_size: int, jobs: list, parallel: str) -> dict:
    """Each tower's outputs; ``parallel="split"``: tensor-parallel with the batch split by rows
    (``batch_sizes``), this rank's rows only, and where they start."""
    results = {}
    for name, directory, inputs in jobs:
        mode = "tensor" if parallel == "split" else parallel
        model = SiglipVisionTransformer.from_pretrained(directory, world_size=world_size, parallel=mode)
        kwargs: dict = {}
        first = 0
        if parallel == "split":
            sizes = _split_plan(len(inputs["pixel_values"]), world_size)
            first = sum(sizes[:rank])
            inputs = {key: value[first : first + sizes[rank]] for key, value in inputs.items()}
            kwargs["batch_sizes"] = sizes
        with torch.inference_mode():
            out = model(**inputs, output_hidden_states=True, **kwargs)
        results[name] = _outputs(out, out.pooler_output is not None)
        results[name]["first"] = torch.tensor(first)
        results[name]["class"] = torch.tensor(int(isinstance(getattr(model, "module", model), Siglip2VisionTransformer)))
    return results


def _valid_rows(name: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """NaFlex token outputs restricted to each image's real patches (data mode zeroes the padding rows)."""
    if not name.startswith("siglip2") or key == "pooler_output":
        return tensor
    counts = torch.tensor(NAFLEX_SHAPES).prod(1)
    return tensor * (torch.arange(NAFLEX_LENGTH)[None, :] < counts[:, None])[..., None]


@pytest.mark.parametrize("world_size, parallel", [(1, "tensor"), (2, "tensor"), (3, "tensor"), (4, "tensor"),
                                                  (2, "data"), (3, "data"), (2, "split"), (3, "split")])
def test_towers_match_transformers(suite, rank_pools, world_size, parallel):
    """Every tower at every world size; ``split``: each rank's own rows of the batch (one rank empty at 3)."""
    _, jobs, refs = suite
    for rank, per_rank in enumerate(rank_pools[1](world_size).run(_encode_towers, jobs, parallel)):
        for name, ours in per_rank.items():
            assert bool(ours.pop("class")) == name.startswith("siglip2"), name
            first = int(ours.pop("first"))
            assert sorted(ours) == sorted(refs[name]), name
            for key, value in ours.items():
                theirs = refs[name][key]
                if parallel == "split":
                    assert first == sum(_split_plan(len(theirs), world_size)[:rank]), (name, first)
                    theirs = theirs[first : first + len(value)]
                    assert len(value) == _split_plan(len(refs[name][key]), world_size)[rank], (name, key)
                if parallel == "data":
                    value, theirs = _valid_rows(name, key, value), _valid_rows(name, key, theirs)
                assert value.shape == theirs.shape, (name, key)
                diff = (value - theirs).abs().max().item() if value.numel() else 0.0
                assert diff <= 1e-4, (name, key, rank, diff)


# ----------------------------------------------------------------------------- inside the VLMs


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    """Tiny Idefics3 and SmolVLM (32 px images, 4x4 patches, 4 tokens each after the connector), a prompt with
    two images (the second padded to half its width) and their logits."""
    root = tmp_path_factory.mktemp("vlms")
    pixels = torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    mask = torch.ones(1, 2, 32, 32, dtype=torch.long)
    mask[0, 1, :, 16:] = 0
    pixels = pixels * mask[:, :, None]
    ids = torch.tensor([[1, 5] + [299] * 4 + [7] + [299] * 4 + [9, 11]])
    prompt = {"input_ids": ids, "pixel_values": pixels, "pixel_attention_mask": mask}
    made = {}
    for name in ("idefics3", "smolvlm"):
        model, directory = getattr(towers, name)(root / name, image_size=32)
        with torch.no_grad():
            made[name] = (str(directory), model(**prompt).logits)
    return root, prompt, made


def _swap_towers(rank: int, world_size: int, prompt: dict, made: dict) -> dict:
    import transformers

    logits = {}
    for name, (directory, _) in made.items():
        cls = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}[name]
        model = getattr(transformers, cls).from_pretrained(directory, attn_implementation="eager").eval()
        model.model.vision_model = SiglipVisionTransformer.from_pretrained(directory, world_size=world_size)
        with torch.no_grad():
            logits[name] = model(**prompt).logits
    return logits


@pytest.mark.parametrize("world_size", [1, 2])
def test_idefics3_and_smolvlm_with_our_tower_give_the_same_logits(vlms, world_size):
    root, prompt, made = vlms
    for per_rank in run_ranks(world_size, root, _swap_towers, prompt, made):
        for name, (_, logits) in made.items():
            torch.testing.assert_close(per_rank[name], logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- refusals that name the fix


def test_config_that_disagrees_with_the_tensors_names_both(suite, tmp_path):
    root, _, _ = suite
    broken = tmp_path / "idefics3"
    shutil.copytree(root / "idefics3", broken)
    config = json.loads((broken / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 96
    config["vision_config"]["intermediate_size"] = 256
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"(?s)config\.json \(vision_config\).*hidden_size: config 96, tensors 64"
                                              r".*intermediate_size: config 256, tensors 128.*config="):
        SiglipVisionTransformer.from_pretrained(broken)
    right = towers.vision_config(towers.read_config(root / "idefics3"), "idefics3")
    model = SiglipVisionTransformer.from_pretrained(broken, config=right)  # config= overrides the file
    assert model.config.hidden_size == 64 and model.head is None


def test_timm_checkpoint_that_disagrees_with_its_architecture_names_both(tmp_path):
    """A timm checkpoint loads (docs/formats.md), but its geometry is its architecture's: tensors of another
    width are an error naming the architecture and both values."""
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_siglip_224", "num_classes": 0}))
    save_file({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="(?s)timm architecture 'vit_base_patch16_siglip_224'.*hidden_size: config 768, tensors 8"):
        SiglipVisionTransformer.from_pretrained(tmp_path)


def test_naflex_call_with_inconsistent_masks_is_refused(suite):
    root, _, _ = suite
    model = SiglipVisionTransformer.from_pretrained(root / "siglip2_vision")
    inputs = _naflex_inputs()
    inputs["spatial_shapes"] = inputs["spatial_shapes"].flip(0)
    with pytest.raises(ValueError, match=r"pixel_attention_mask\[1\] has 6 valid patch\(es\) but spatial_shapes\[1\] = \(3, 3\) needs 9"):
        model(**inputs)
    with pytest.raises(TypeError, match="spatial_shapes"):
        model(inputs["pixel_values"], inputs["pixel_attention_mask"])
