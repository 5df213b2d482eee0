"""The NaFlex / Idefics3 building blocks (embeddings, input checks, balancing), checked against transformers on the same weights.

* ``NaFlexEmbeddings`` against ``Siglip2VisionEmbeddings`` from a tiny perturbed ``Siglip2VisionModel``. The
  batch mixes native, up- and down-sampled, width-1 and full/padded grids.
* ``idefics3_position_ids`` against the ids that ``Idefics3VisionEmbeddings`` feeds its position table,
  captured with a forward hook on the real module.
* ``check_naflex_inputs``: each bad input gives its own error type and message.
* ``balance_by_cost`` / ``split_by_count``: properties (hypothesis) and the skewed-batch figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer
from tp_siglip.checks import check_naflex_inputs
from tp_siglip.data_parallel import balance_by_cost, split_by_count
from tp_siglip.embeddings import NaFlexEmbeddings, antialiased_bilinear_weights, idefics3_position_ids

import towers


def max_share(costs: Sequence[int], assignment: Sequence[Sequence[int]]) -> float:
    """The largest part's share of the total cost (1/parts is perfect balance; 0.0 if everything is free)."""
    total = sum(costs)
    if total == 0:
        return 0.0
    return max(sum(costs[i] for i in part) for part in assignment) / total


def _naflex_config(**fields) -> SiglipVisionConfig:
    return SiglipVisionConfig(variant="naflex", num_attention_heads=4, **fields)

# (h, w) grids for a 4x4 table with N = 24 patches per image: native, full (h*w == N), width/height 1, upsampled
SHAPES = [(4, 4), (4, 6), (2, 3), (1, 1), (3, 1), (1, 5), (6, 4), (5, 4), (2, 12), (1, 24), (2, 3)]
LENGTH = 24


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory: pytest.TempPathFactory):
    model, _ = towers.siglip2_vision(tmp_path_factory.mktemp("siglip2"))
    return model


def _ours_from(reference: torch.nn.Module, **kwargs) -> NaFlexEmbeddings:
    config = reference.config
    ours = NaFlexEmbeddings(
        _naflex_config(
            num_channels=config.num_channels,
            patch_size=config.patch_size,
            hidden_size=config.hidden_size,
            num_patches=config.num_patches,
        ),
        **kwargs,
    )
    ours.load_state_dict(reference.embeddings.state_dict())
    return ours


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(SHAPES), LENGTH, 3 * 8 * 8, generator=gen)
    return pixels, torch.tensor(SHAPES, dtype=torch.long)


@torch.no_grad()
def test_embeddings_match_transformers(siglip2) -> None:
    ours = _ours_from(siglip2)
    pixels, shapes = _batch()
    expected = siglip2.embeddings(pixels, shapes)
    got = ours(pixels, shapes)
    assert got.shape == expected.shape == (len(SHAPES), LENGTH, 64)
    assert (got - expected).abs().max().item() <= 1e-6


@torch.no_grad()
def test_embeddings_bfloat16_follow_transformers(siglip2) -> None:
    """bf16 weights: bf16 output, the grid resized in float32 (to within bf16 rounding of transformers)."""
    ours = _ours_from(siglip2).to(torch.bfloat16)
    reference = siglip2.embeddings.to(torch.bfloat16)
    try:
        pixels, shapes = _batch(1)
        got, expected = ours(pixels, shapes), reference(pixels, shapes)
    finally:
        siglip2.embeddings.float()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=1e-2)


@torch.no_grad()
def test_one_resize_per_distinct_shape(siglip2, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = _ours_from(siglip2)
    calls: list[tuple[int, int]] = []
    original = NaFlexEmbeddings.position_grid
    monkeypatch.setattr(
        NaFlexEmbeddings, "position_grid", lambda self, h, w: calls.append((h, w)) or original(self, h, w)
    )
    pixels, shapes = _batch()
    ours(pixels, shapes)
    assert sorted(calls) == sorted(set(SHAPES))


def test_width_one_weights_are_not_constant() -> None:
    """A 4 -> 3 resize samples different rows (torch 2.13's CPU ``F.interpolate`` gets width-1 outputs wrong)."""
    weights = antialiased_bilinear_weights(3, 4)
    assert torch.allclose(weights.sum(1), torch.ones(3))
    assert not torch.allclose(weights[0], weights[2])
    assert torch.equal(antialiased_bilinear_weights(4, 4), torch.eye(4))


def test_meta_device_and_bad_shapes() -> None:
    with torch.device("meta"):
        meta = NaFlexEmbeddings(_naflex_config(num_channels=3, patch_size=8, hidden_size=64, num_patches=16))
    assert meta.position_embedding.weight.is_meta and meta.patch_embedding.weight.is_meta
    out = meta(torch.empty(2, 24, 192, device="meta"), torch.tensor([[2, 3], [4, 6]]))
    assert out.shape == (2, 24, 64) and out.is_meta
    with pytest.raises(ValueError, match="num_patches 15 must be a square"):
        _naflex_config(num_channels=3, patch_size=8, hidden_size=64, num_patches=15)


# ----------------------------------------------------------------------------------------------- input checks


def _valid() -> dict[str, torch.Tensor]:
    """B=2, N=6, C=3, p=2: grids 2x3 (full) and 1x2 (padded)."""
    return {
        "pixel_values": torch.randn(2, 6, 12),
        "pixel_attention_mask": torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]], dtype=torch.int32),
        "spatial_shapes": torch.tensor([[2, 3], [1, 2]]),
    }


def _check(**changes: object) -> None:
    inputs: dict[str, object] = {**_valid(), **changes}
    check_naflex_inputs(**inputs, num_channels=3, patch_size=2)


def test_valid_inputs_pass() -> None:
    _check()
    _check(pixel_attention_mask=_valid()["pixel_attention_mask"].bool())
    _check(spatial_shapes=_valid()["spatial_shapes"].int())
    _check(pixel_values=torch.full((2, 6, 12), float("nan")), check_finite=False)


BAD = [
    ({"pixel_values": [[0.0]]}, TypeError, r"pixel_values must be a torch.Tensor of shape \(B, N, C\*p\*p\), got list"),
    ({"pixel_values": torch.zeros(2, 3, 4, 4)}, ValueError, r"pixel_values must be 3-D .* got shape \(2, 3, 4, 4\)"),
    ({"pixel_values": torch.zeros(2, 6, 12, dtype=torch.uint8)}, TypeError, r"floating-point tensor, got dtype torch.uint8"),
    ({"pixel_values": torch.zeros(2, 6, 13)}, ValueError, r"13 values per patch .* C\*p\*p = 3\*2\*2 = 12"),
    ({"pixel_values": torch.zeros(0, 6, 12)}, ValueError, r"pixel_values is empty"),
    ({"pixel_attention_mask": None}, TypeError, r"pixel_attention_mask must be a torch.Tensor .* got NoneType"),
    ({"pixel_attention_mask": torch.ones(12)}, ValueError, r"pixel_attention_mask must be 2-D"),
    ({"pixel_attention_mask": torch.ones(2, 5)}, ValueError, r"pixel_attention_mask must have shape \(2, 6\) .* got \(2, 5\)"),
    ({"pixel_attention_mask": torch.ones(2, 6)}, TypeError, r"bool or an integer tensor of 0/1, got dtype torch.float32"),
    (
        {"pixel_attention_mask": torch.tensor([[1] * 6, [2, 1, 0, 0, 0, 0]])},
        ValueError,
        r"only 0 and 1, found value\(s\) \[2\]",
    ),
    ({"spatial_shapes": [[2, 3], [1, 2]]}, TypeError, r"spatial_shapes must be a torch.Tensor .* got list"),
    ({"spatial_shapes": torch.tensor([[2.0, 3.0], [1.0, 2.0]])}, TypeError, r"integer tensor .* got dtype torch.float32"),
    ({"spatial_shapes": torch.tensor([[2, 3, 1], [1, 2, 1]])}, ValueError, r"shape \(2, 2\) for 2 image\(s\), got \(2, 3\)"),
    ({"spatial_shapes": torch.tensor([[2, 3]])}, ValueError, r"shape \(2, 2\) for 2 image\(s\), got \(1, 2\)"),
    ({"spatial_shapes": torch.tensor([[2, 3], [0, 2]])}, ValueError, r"spatial_shapes\[1\] = \(0, 2\); both .* positive"),
    (
        {"spatial_shapes": torch.tensor([[3, 3], [1, 2]])},
        ValueError,
        r"spatial_shapes\[0\] = \(3, 3\) needs 9 patches but pixel_values holds only 6",
    ),
    (
        {"pixel_attention_mask": torch.tensor([[1] * 5 + [0], [1, 1, 0, 0, 0, 0]])},
        ValueError,
        r"pixel_attention_mask\[0\] has 5 valid patch\(es\) but spatial_shapes\[0\] = \(2, 3\) needs 6",
    ),
    (
        {"pixel_attention_mask": torch.tensor([[1] * 6, [0, 1, 1, 0, 0, 0]]).bool()},
        ValueError,
        r"pixel_attention_mask\[1\] must be 2 ones followed by zeros",
    ),
    (
        {"pixel_values": torch.tensor([float("inf")]).expand(2, 6, 12).clone()},
        ValueError,
        r"pixel_values contain 144 NaN or infinite",
    ),
]


@pytest.mark.parametrize(("changes", "error", "message"), BAD)
def test_bad_inputs(changes: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        _check(**changes)


# ------------------------------------------------------------------------------------------- idefics3 ids


def _transformers_ids(embeddings: torch.nn.Module, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """The position ids ``Idefics3VisionEmbeddings`` looks up, captured from its ``position_embedding``."""
    seen: list[torch.Tensor] = []
    hook = embeddings.position_embedding.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        batch, rows, cols = mask.shape
        with torch.no_grad():
            embeddings(torch.randn(batch, 3, rows * patch, cols * patch), patch_attention_mask=mask)
    finally:
        hook.remove()
    return seen[0]


def _masks(extents: list[tuple[int, int]], rows: int, cols: int) -> torch.Tensor:
    mask = torch.zeros(len(extents), rows, cols, dtype=torch.bool)
    for index, (h, w) in enumerate(extents):
        mask[index, :h, :w] = True
    return mask


def test_idefics3_ids_match_tiny_tower(tmp_path: Path) -> None:
    """The Idefics3 test tower (5x5 native grid): full, partly padded, larger-than-native and irregular masks."""
    model, _ = towers.idefics3(tmp_path / "idefics3")
    embeddings = towers.vision_tower(model).embeddings
    mask = _masks([(5, 5), (3, 4), (5, 2), (1, 1), (2, 5), (7, 6), (6, 3)], 7, 6)
    mask[6, 4, 0] = False  # irregular: transformers measures rows in column 0 and columns in row 0
    expected = _transformers_ids(embeddings, mask, 8)
    got = idefics3_position_ids(mask, 5)
    assert got.dtype == torch.long and got.shape == (7, 42)
    assert torch.equal(got, expected)
    assert torch.equal(got[~mask.flatten(1)], torch.zeros_like(got[~mask.flatten(1)]))


@pytest.mark.parametrize("side", [25, 26, 27, 32])
def test_idefics3_ids_match_real_grid_sizes(side: int) -> None:
    """Grids of the shipped towers (26, 27, 32) and one (25) where float rounding breaks ``arange``."""
    from transformers import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    embeddings = Idefics3VisionEmbeddings(Idefics3VisionConfig(hidden_size=4, patch_size=2, image_size=2 * side))
    gen = torch.Generator().manual_seed(side)
    extents = [(side, side)] + [tuple(torch.randint(1, side + 1, (2,), generator=gen).tolist()) for _ in range(5)]
    mask = _masks(extents, side, side)
    got = idefics3_position_ids(mask, side)
    assert torch.equal(got, _transformers_ids(embeddings, mask, 2))
    is_arange = torch.equal(got[0], torch.arange(side * side))
    assert is_arange == (side != 25)  # a full 25x25 image repeats some ids in transformers


def test_patch_attention_mask_bad_arguments() -> None:
    model = SiglipVisionTransformer(SiglipVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=32, patch_size=8))
    pixels = torch.zeros(2, 3, 32, 32)
    with pytest.raises(TypeError, match="patch_attention_mask must be a bool tensor, got dtype torch.int64"):
        model(pixels, patch_attention_mask=torch.ones(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"patch_attention_mask has shape \(4,\).*\(2, 4, 4\)"):
        model(pixels, patch_attention_mask=torch.ones(4, dtype=torch.bool))
    empty = torch.ones(2, 4, 4, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match="an image with no valid patch"):
        model(pixels, patch_attention_mask=empty)


# ---------------------------------------------------------------------------------------------- balancing

COSTS = st.lists(st.integers(min_value=0, max_value=2000), min_size=0, max_size=24)
PARTS = st.integers(min_value=1, max_value=6)


def _loads(costs: list[int], assignment: list[list[int]]) -> list[int]:
    return [sum(costs[i] for i in part) for part in assignment]


@settings(max_examples=60, deadline=None)
@given(costs=COSTS, parts=PARTS)
def test_balance_by_cost_properties(costs: list[int], parts: int) -> None:
    assignment = balance_by_cost(costs, parts)
    assert len(assignment) == parts
    assert sorted(i for part in assignment for i in part) == list(range(len(costs)))
    assert all(part == sorted(part) for part in assignment)
    assert assignment == balance_by_cost(list(costs), parts)  # deterministic
    if costs:  # greedy list-scheduling bound: no part exceeds the average by more than one item
        assert max(_loads(costs, assignment)) <= sum(costs) / parts + max(costs) * (1 - 1 / parts) + 1e-9


@settings(max_examples=40, deadline=None)
@given(costs=COSTS, parts=PARTS)
def test_split_by_count_properties(costs: list[int], parts: int) -> None:
    assignment = split_by_count(costs, parts)
    assert len(assignment) == parts
    assert [i for part in assignment for i in part] == list(range(len(costs)))  # contiguous, in order
    sizes = [len(part) for part in assignment]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_skewed_batch_figures() -> None:
    """One 1024-patch image and seven 64-patch ones: balancing isolates the big image (the best possible)."""
    costs = [1024] + [64] * 7
    total = sum(costs)
    assert balance_by_cost(costs, 2) == [[0], [1, 2, 3, 4, 5, 6, 7]]
    four = balance_by_cost(costs, 4)
    assert [0] in four and sorted(len(part) for part in four) == [1, 2, 2, 3]
    for parts in (2, 4):
        assert max_share(costs, balance_by_cost(costs, parts)) == 1024 / total  # lower bound: the largest item
    assert max_share(costs, split_by_count(costs, 2)) == (1024 + 3 * 64) / total
    assert max_share(costs, split_by_count(costs, 4)) == (1024 + 64) / total


@pytest.mark.parametrize(
    ("costs", "parts", "error", "message"),
    [
        ([1, 2], 0, ValueError, "parts must be a positive int, got 0"),
        ([1, 2], 2.0, TypeError, "parts must be a positive int, got 2.0"),
        ([1, -2], 2, ValueError, r"costs\[1\] must be non-negative, got -2"),
        ([1, 2.5], 2, TypeError, r"costs\[1\] must be an int, got 2.5"),
        ("12", 2, TypeError, "costs must be a sequence of non-negative ints, got str"),
    ],
)
def test_balance_bad_arguments(costs: object, parts: object, error: type[Exception], message: str) -> None:
    for function in (balance_by_cost, split_by_count):
        with pytest.raises(error, match=message):
            function(costs, parts)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ tower builders

VISION_MODEL_TYPE = {
    "siglip2_vision": "siglip2_vision_model",
    "siglip2": "siglip2_vision_model",
    "idefics3": "idefics3_vision",
    "smolvlm": "smolvlm_vision",
    "colpali": "siglip_vision_model",
    "gemma3": "siglip_vision_model",
    "llava_onevision": "siglip_vision_model",
    "llava": "siglip_vision_model",
}

TEXT_ACT = {"idefics3": "silu", "smolvlm": "silu", "colpali": "gelu_pytorch_tanh", "siglip2": "gelu_pytorch_tanh",
            "gemma3": None, "llava_onevision": "silu", "llava": "silu"}  # gemma3 text names it hidden_activation


@pytest.mark.parametrize("name", sorted(towers.BUILDERS))
def test_tower_builders_write_the_documented_layout(name: str, tmp_path: Path) -> None:
    """Each tower's tensors sit under its KEY_PREFIX, none constant; the vision config where VISION_CONFIG_PATH says."""
    from safetensors.torch import load_file

    model, directory = towers.BUILDERS[name](tmp_path / name)
    tower = towers.vision_tower(model)
    saved = load_file(str(directory / "model.safetensors"))
    prefix = towers.KEY_PREFIX[name]
    for key, value in tower.state_dict().items():
        assert torch.equal(saved[prefix + key], value), key
        assert value.numel() == 1 or value.float().std() > 0, f"{key} is constant"
    has_head = any(key.startswith(prefix + "head.") for key in saved)
    assert has_head == (name.startswith("siglip2") or name == "llava")
    config = towers.read_config(directory)
    assert towers.vision_config(config, name)["model_type"] == VISION_MODEL_TYPE[name]
    text = config["vlm_config"]["text_config"] if name == "colpali" else config.get("text_config", {})
    assert text.get("hidden_act") == TEXT_ACT.get(name)  # a text config can look like a vision one
    assert tower.config._attn_implementation == "eager"
