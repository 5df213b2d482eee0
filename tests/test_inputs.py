"""Bad pixel inputs are refused before any compute, with the value and the fix in the message."""

from __future__ import annotations

import pytest
import torch

from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer

CONFIG = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def model():
    return SiglipVisionTransformer(CONFIG).eval()


@pytest.mark.parametrize(
    "pixels, kwargs, error, message",
    [
        ([[1.0]], {}, TypeError, "torch.Tensor.*list"),
        (torch.zeros(3, 32, 32), {}, ValueError, r"4-D.*\(3, 32, 32\)"),
        (torch.zeros(1, 4, 32, 32), {}, ValueError, "4 channels"),
        (torch.zeros(1, 32, 32, 3), {}, ValueError, "32 channels.*channels-first"),
        (torch.zeros(1, 3, 40, 40), {}, ValueError, "40x40.*32x32.*interpolate_pos_encoding=True"),
        (torch.zeros(1, 3, 36, 40), {"interpolate_pos_encoding": True}, ValueError, "36x40.*multiples of the patch size 8"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), {}, TypeError, "floating-point.*torch.uint8"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.bool), {}, TypeError, "torch.bool"),
        (torch.zeros(0, 3, 32, 32), {}, ValueError, r"empty batch.*\(0, 3, 32, 32\)"),
        (torch.full((1, 3, 32, 32), float("nan")), {}, ValueError, "3072 NaN or infinite.*check_finite"),
        (torch.zeros(1, 3, 32, 32), {"interpolate_pos_encoding": "yes"}, TypeError, "'yes'"),
        (torch.zeros(1, 3, 32, 32), {"output_attentions_typo": True}, TypeError, "output_attentions_typo"),
        (torch.zeros(1, 3, 32, 32), {"output_hidden_states": "False"}, TypeError, "output_hidden_states.*'False'"),
        (torch.zeros(1, 3, 32, 32), {"return_dict": 0}, TypeError, "return_dict must be a bool or None, got 0"),
        (torch.zeros(1, 3, 32, 32), {"output_attentions": "no"}, TypeError, "output_attentions.*'no'"),
        (torch.zeros(1, 3, 32, 32, device="meta"), {}, ValueError, "on meta but the model is on cpu.*to\\(model.device\\)"),
    ],
)
def test_bad_pixels(model, pixels, kwargs, error, message):
    with pytest.raises(error, match=message):
        model(pixels, **kwargs)


def test_finite_check_can_be_switched_off(model):
    pixels = torch.zeros(1, 3, 32, 32)
    pixels[0, 0, 0, 0] = float("inf")
    try:
        model.check_finite = False
        out = model(pixels)
    finally:
        model.check_finite = True
    assert out.last_hidden_state.shape == (1, 16, 32)


def test_accepted_inputs(model):
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32, dtype=torch.float64)).last_hidden_state.dtype == torch.float32
        assert model(torch.zeros(1, 3, 48, 24), interpolate_pos_encoding=True).last_hidden_state.shape == (1, 18, 32)
        # transformers-style keywords that servers pass are accepted
        assert model(torch.zeros(1, 3, 32, 32), return_dict=True, output_attentions=False).pooler_output.shape == (1, 32)
        last, pooler = model(torch.zeros(1, 3, 32, 32), return_dict=False)  # a tuple, as transformers returns
        assert last.shape == (1, 16, 32) and pooler.shape == (1, 32)


def test_unloaded_model_refuses_to_run():
    skeleton = SiglipVisionTransformer(CONFIG, device="meta")
    with pytest.raises(RuntimeError, match="load_weights"):
        skeleton(torch.zeros(1, 3, 32, 32))


def test_output_object_behaves_like_transformers(model):
    out = model(torch.zeros(1, 3, 32, 32), output_hidden_states=True)
    assert out[0] is out.last_hidden_state and out["pooler_output"] is out.pooler_output
    assert out.keys() == ["last_hidden_state", "pooler_output", "hidden_states"]
    out.pooler_output = torch.ones(1)
    assert out.to_tuple()[1].shape == (1,)
    with pytest.raises(KeyError):
        out["attentions"]


def test_attention_weights_are_not_offered(model):
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(torch.zeros(1, 3, 32, 32), output_attentions=True)
