"""Parity with transformers' SiglipVisionModel (eager, fp32) at world sizes 1-4, every checkpoint layout.

One spawn per world size runs every job (checkpoint layout x input x dtype) and returns each rank's
outputs; the tests then compare them with transformers' outputs on the same weights, and the ranks with
each other (bitwise).
"""

from __future__ import annotations

import pytest
import torch

from checkpoints import LAYOUTS, SO400M_2L, TINY, has_head, save_layout, vision_model
from distributed import run_ranks

WORLD_SIZES = (1, 2, 3, 4)


def _reference(model, pixels: torch.Tensor, interpolate: bool, head: bool) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    ref = {"last_hidden_state": out.last_hidden_state}
    if head:
        ref["pooler_output"] = out.pooler_output
    ref.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
    return ref


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Checkpoints, inputs, transformers references and the job list shared by all world sizes."""
    root = tmp_path_factory.mktemp("parity")
    torch.manual_seed(1234)
    tiny = vision_model(TINY, seed=1)
    inputs = {
        "native": torch.randn(3, 3, 32, 32),
        "interp": torch.randn(2, 3, 48, 40),
    }
    jobs, refs = [], {}
    for layout in LAYOUTS:
        directory = save_layout(tiny, layout, root / layout)
        for name, interpolate in (("native", False), ("interp", True)):
            job = f"{layout}-{name}"
            jobs.append(dict(name=job, ckpt=str(directory), input=name, interpolate=interpolate, kwargs={}))
            refs[job] = _reference(tiny, inputs[name], interpolate, has_head(layout))
    jobs.append(dict(name="eager", ckpt=str(root / "v5_vision"), input="native", interpolate=False,
                     kwargs={"attn_implementation": "eager"}))
    refs["eager"] = refs["v5_vision-native"]
    jobs.append(dict(name="bf16", ckpt=str(root / "v5_vision"), input="native", interpolate=False,
                     kwargs={"dtype": "bfloat16"}))
    refs["bf16"] = refs["v5_vision-native"]
    with torch.no_grad():  # transformers' own bf16 error on the same input: the yardstick for ours
        bf16 = vision_model(TINY, seed=1).to(torch.bfloat16)
        refs["bf16-transformers"] = _reference(bf16, inputs["native"].to(torch.bfloat16), False, True)
        del bf16

    big = vision_model(SO400M_2L, seed=2)
    inputs["so400m"] = torch.randn(2, 3, 384, 384)
    directory = save_layout(big, "v5_vision", root / "so400m")
    jobs.append(dict(name="so400m", ckpt=str(directory), input="so400m", interpolate=False, kwargs={}))
    refs["so400m"] = _reference(big, inputs["so400m"], False, True)
    del big

    return root, refs, inputs, jobs


def _parity_worker(rank: int, world_size: int, inputs: dict, jobs: list) -> dict:
    from tp_siglip import SiglipVisionTransformer

    outputs = {}
    for job in jobs:
        model = SiglipVisionTransformer.from_pretrained(job["ckpt"], world_size=world_size, **job["kwargs"])
        pixels = inputs[job["input"]]
        with torch.inference_mode():
            out = model(pixels, output_hidden_states=True, interpolate_pos_encoding=job["interpolate"])
        result = {"last_hidden_state": out.last_hidden_state}
        if out.pooler_output is not None:
            result["pooler_output"] = out.pooler_output
        result.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
        outputs[job["name"]] = result
    return outputs


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda ws: f"ws{ws}")
def results(request, suite):
    root, refs, inputs, jobs = suite
    ws = request.param
    per_rank = run_ranks(ws, root, _parity_worker, inputs, jobs)
    out = {job["name"]: [per_rank[r][job["name"]] for r in range(ws)] for job in jobs}
    return ws, out, refs


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("inputs", ["native", "interp"])
def test_layout_parity(results, layout, inputs):
    """Every output (last_hidden_state, pooler_output, all hidden_states) within 1e-4 of transformers."""
    ws, out, refs = results
    job = f"{layout}-{inputs}"
    for rank_out in out[job]:
        assert ("pooler_output" in rank_out) == has_head(layout)
        assert len([k for k in rank_out if k.startswith("hidden_states.")]) == TINY["num_hidden_layers"] + 1
        assert _max_diff(rank_out, refs[job]) <= 1e-4


def test_eager_attention_parity(results):
    ws, out, refs = results
    for rank_out in out["eager"]:
        assert _max_diff(rank_out, refs["eager"]) <= 1e-4


def test_so400m_geometry_parity(results):
    """1152 hidden, 4304 MLP (split unevenly at 3 ranks), 16 heads of 72, patch 14 at 384 px: 729 patches."""
    ws, out, refs = results
    for rank_out in out["so400m"]:
        assert rank_out["last_hidden_state"].shape == (2, 729, 1152)
        assert _max_diff(rank_out, refs["so400m"]) <= 5e-4


def test_bf16_parity(results):
    """bf16 has an 8-bit mantissa, so bf16 outputs differ from fp32 by a few 1e-2 after a few layers
    whatever the implementation. We require our bf16 error (vs transformers fp32) to be no larger than
    1.5x transformers' own bf16 error on the same weights and input, plus 1e-2 of slack for rounding
    order: any real bug (a wrong slice, a missing bias) is orders of magnitude bigger."""
    ws, out, refs = results
    ours = [_max_diff(r, refs["bf16"]) for r in out["bf16"]]
    theirs = _max_diff(refs["bf16-transformers"], refs["bf16"])
    assert all(o <= 1.5 * theirs + 1e-2 for o in ours), (ours, theirs)
    assert all(r["last_hidden_state"].dtype == torch.bfloat16 for r in out["bf16"])


def test_ranks_bitwise_identical(results):
    """Every rank returns the very same bits (all-reduce results are shared, the rest is replicated)."""
    ws, out, refs = results
    for job, per_rank in out.items():
        for other in per_rank[1:]:
            for key, value in per_rank[0].items():
                assert torch.equal(value, other[key]), (job, key)
