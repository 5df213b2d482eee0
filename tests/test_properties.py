"""Property tests: random small geometries x world sizes 1-4 x batches x resolutions agree with
transformers. Long-lived rank pools keep each example cheap; examples are derandomized so CI is stable."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoints import save_layout, vision_model

_counter = itertools.count()


@pytest.fixture(scope="module")
def pools(rank_pools):
    return rank_pools


@st.composite
def cases(draw):
    heads = draw(st.integers(1, 6))
    patch = draw(st.sampled_from([2, 4, 8]))
    grid = draw(st.integers(1, 5))
    config = dict(
        num_attention_heads=heads,
        hidden_size=heads * draw(st.sampled_from([4, 8, 12])),
        intermediate_size=draw(st.integers(1, 80)),
        num_hidden_layers=draw(st.integers(1, 3)),
        patch_size=patch,
        image_size=patch * grid + draw(st.integers(0, patch - 1)),  # the conv drops a remainder
        hidden_act=draw(st.sampled_from(["gelu_pytorch_tanh", "gelu", "quick_gelu", "gelu_new"])),
        vision_use_head=draw(st.booleans()),
    )
    world_size = draw(st.integers(1, min(4, heads)))
    interpolate = draw(st.booleans())
    if interpolate:
        size = (patch * draw(st.integers(1, 6)), patch * draw(st.integers(1, 6)))
    else:
        size = (config["image_size"], config["image_size"])
    return config, world_size, draw(st.integers(1, 3)), size, interpolate


def _run(rank: int, world_size: int, ckpt: str, pixels: torch.Tensor, interpolate: bool):
    from tp_siglip import SiglipVisionTransformer

    model = SiglipVisionTransformer.from_pretrained(ckpt, world_size=world_size)
    with torch.inference_mode():
        out = model(pixels, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    return out.last_hidden_state.clone(), None if out.pooler_output is None else out.pooler_output.clone(), [
        h.clone() for h in out.hidden_states
    ]


@settings(max_examples=30)
@given(case=cases())
def test_random_geometries_match_transformers(pools, case):
    config, world_size, batch, (height, width), interpolate = case
    root, get_pool = pools
    reference = vision_model(config, seed=next(_counter))
    ckpt = save_layout(reference, "v5_vision", Path(root) / f"case-{next(_counter)}")
    pixels = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        ref = reference(pixels, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    for last, pooled, states in get_pool(world_size).run(_run, str(ckpt), pixels, interpolate):
        torch.testing.assert_close(last, ref.last_hidden_state, atol=1e-4, rtol=0)
        if config["vision_use_head"]:
            torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-4, rtol=0)
        else:
            assert pooled is None
        assert len(states) == len(ref.hidden_states)
        for ours, theirs in zip(states, ref.hidden_states):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@st.composite
def naflex_cases(draw):
    heads = draw(st.integers(1, 4))
    patch = draw(st.sampled_from([2, 4]))
    overrides = dict(
        num_attention_heads=heads,
        hidden_size=heads * draw(st.sampled_from([4, 8])),
        intermediate_size=draw(st.integers(1, 40)),
        num_hidden_layers=draw(st.integers(1, 2)),
        patch_size=patch,
        num_patches=draw(st.integers(2, 4)) ** 2,
        vision_use_head=draw(st.booleans()),
    )
    shapes = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4))
    length = max(h * w for h, w in shapes) + draw(st.integers(0, 3))  # max_num_patches
    world_size = draw(st.integers(1, min(4, heads)))
    return overrides, shapes, length, world_size, draw(st.sampled_from(["tensor", "data"]))


def _run_naflex(rank: int, world_size: int, ckpt: str, inputs: dict, parallel: str):
    from tp_siglip import SiglipVisionTransformer

    model = SiglipVisionTransformer.from_pretrained(ckpt, world_size=world_size, parallel=parallel)
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=True)
    return out.last_hidden_state.clone(), None if out.pooler_output is None else out.pooler_output.clone()


@settings(max_examples=8)
@given(case=naflex_cases())
def test_random_naflex_batches_match_transformers(pools, case):
    """Random NaFlex geometries, image grids and max_num_patches, tensor or data mode, 1-4 ranks."""
    import towers

    overrides, shapes, length, world_size, parallel = case
    root, get_pool = pools
    reference, ckpt = towers.siglip2_vision(Path(root) / f"naflex-{next(_counter)}", seed=next(_counter), **overrides)
    grid = torch.tensor(shapes)
    valid = torch.arange(length)[None, :] < grid.prod(1)[:, None]
    features = 3 * overrides["patch_size"] ** 2
    inputs = {"pixel_values": torch.randn(len(shapes), length, features) * valid[..., None],
              "pixel_attention_mask": valid.to(torch.int32), "spatial_shapes": grid}
    with torch.no_grad():
        ref = reference(**inputs)
    for last, pooled in get_pool(world_size).run(_run_naflex, str(ckpt), inputs, parallel):
        # data mode returns zeros past each image's patches (each rank drops the padding it does not need)
        keep = valid[..., None] if parallel == "data" else torch.ones_like(valid[..., None])
        torch.testing.assert_close(last * keep, ref.last_hidden_state * keep, atol=1e-4, rtol=0)
        if overrides["vision_use_head"]:
            torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-4, rtol=0)
        else:
            assert pooled is None
