"""Ranks that get different or invalid inputs all fail at once, with a message naming what and where.

Every forward first runs one small all-gather (`tp_siglip.parallel.agree_on_inputs`): shapes, dtypes and
flags must match on every rank and every rank's local checks must pass; otherwise every rank raises,
before any compute (no hang until the group timeout, no silently wrong numbers). Each spawn runs many
cases on one group, in tensor and data mode, and returns what each rank saw; a final plain forward
checks that the ranks are still in step after all those failures, and no raised error is left in a
reference cycle (which would keep the process group alive into interpreter exit).
"""

from __future__ import annotations

import contextlib
import gc
import time

import pytest
import torch
import torch.distributed as dist

from tp_siglip.parallel import agree_on_inputs, input_signature, tensor_checksum
from tp_siglip.parallel.agreement import _input_verdict

from distributed import run_ranks

CONFIG = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6, image_size=32, patch_size=8)


def _pixels(batch: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _outcome(model, pixels, **kwargs) -> dict:
    """What one call did on this rank: the error (type, message) or the output, and how long it took."""
    start = time.monotonic()
    try:
        with torch.inference_mode():
            out = model(pixels, **kwargs)
        result = {"error": None, "pooler": out.pooler_output}
    except Exception as err:  # the test compares what each rank was told
        result = {"error": type(err).__name__, "message": str(err)}
    result["seconds"] = time.monotonic() - start
    return result


def _cases(rank: int, world_size: int) -> dict[str, tuple]:
    """Case name -> (this rank's pixels, this rank's forward kwargs, check_inputs_agree mode)."""
    last = world_size - 1
    nan = _pixels(2)
    nan[0, 0, 0, 0] = float("nan")
    return {
        "batch 1 vs 24": (_pixels(1 if rank == 0 else 24), {}, "shapes"),
        "batch 1 vs 2": (_pixels(1 if rank == 0 else 2), {}, "shapes"),
        "only the last rank differs": (_pixels(3 if rank == last else 2), {}, "shapes"),
        "dtype": (_pixels(2, dtype=torch.float64 if rank == 1 else torch.float32), {}, "shapes"),
        "output_hidden_states": (_pixels(2), {"output_hidden_states": rank == 1}, "shapes"),
        "interpolate_pos_encoding": (_pixels(2), {"interpolate_pos_encoding": rank == 1}, "shapes"),
        "NaN on rank 1": (nan if rank == 1 else _pixels(2), {}, "shapes"),
        "not a tensor on rank 1": ([[0.0]] if rank == 1 else _pixels(2), {}, "shapes"),
        "unknown keyword on rank 1": (_pixels(2), {"bogus": 1} if rank == 1 else {}, "shapes"),
        "return_dict 0 on rank 1": (_pixels(2), {"return_dict": 0} if rank == 1 else {}, "shapes"),
        "values differ, shapes only": (_pixels(2, seed=rank), {}, "shapes"),
        "values differ, checksum": (_pixels(2, seed=rank), {}, "checksum"),
        "images swapped, checksum": (_pixels(2).flip(0) if rank == 1 else _pixels(2), {}, "checksum"),
        "same inputs, checksum": (_pixels(2), {}, "checksum"),
        "mode differs": (_pixels(2), {}, "checksum" if rank == 1 else "shapes"),
        "still in step": (_pixels(5, seed=9), {}, "shapes"),
    }


def _split_cases(rank: int, world_size: int) -> dict[str, tuple]:
    """``batch_sizes`` cases (tensor mode): rank 0 holds 2 of 3 images, the last rank 1, any others none."""
    sizes = [2] + [0] * (world_size - 2) + [1]
    first = sum(sizes[:rank])
    mine = _pixels(3, seed=5)[first : first + sizes[rank]]
    return {
        "rows": (mine, {"batch_sizes": sizes}),
        "rank 0 passes 3 rows": (_pixels(3, seed=5) if rank == 0 else mine, {"batch_sizes": sizes}),
        "lists differ": (mine, {"batch_sizes": sizes if rank != 1 else [sizes[0] + 5, *sizes[1:]]}),
        "only rank 1 splits": (_pixels(3, seed=5) if rank != 1 else mine, {"batch_sizes": sizes} if rank == 1 else {}),
        "one count too many": (mine, {"batch_sizes": [*sizes, 0]}),
        "no image at all": (_pixels(1)[:0], {"batch_sizes": [0] * world_size}),
    }


def _exceptions_left_in_cycles(fn) -> list[str]:
    """Call ``fn`` (which raises), drop the error, and list exceptions that only the cycle collector frees.

    An exception in a reference cycle (error -> traceback -> frame -> error) outlives its ``except``
    block, and the frames it holds keep the process group alive, into interpreter exit if need be.
    """
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with contextlib.suppress(Exception):
            fn()
        gc.collect()
        return [type(o).__name__ for o in gc.garbage if isinstance(o, BaseException)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _every_case(rank: int, world_size: int) -> dict:
    from tp_siglip import DataParallelEncoder, SiglipVisionConfig, SiglipVisionTransformer
    from tp_siglip.parallel import agree_on_failure

    config = SiglipVisionConfig(**CONFIG)
    models = {
        "tensor": SiglipVisionTransformer(config, dist.group.WORLD, seed=4).eval(),
        "data": DataParallelEncoder(SiglipVisionTransformer(config, seed=4).eval(), dist.group.WORLD),
    }
    outcomes = {}
    for mode, model in models.items():
        for name, (pixels, kwargs, agree) in _cases(rank, world_size).items():
            model.check_inputs_agree = agree
            outcomes[(mode, name)] = _outcome(model, pixels, **kwargs)
    for name, (pixels, kwargs) in _split_cases(rank, world_size).items():
        models["tensor"].check_inputs_agree = "shapes"
        outcomes[("split", name)] = _outcome(models["tensor"], pixels, **kwargs)
    outcomes[("data", "batch_sizes")] = _outcome(models["data"], _pixels(3, seed=5), batch_sizes=[3] + [0] * (world_size - 1))
    # ranks that loaded different models (another layer count, another dtype) would pair their collectives wrongly
    fewer = SiglipVisionConfig(**{**CONFIG, "num_hidden_layers": 1}) if rank == 1 else config
    outcomes[("tensor", "layers differ")] = _outcome(SiglipVisionTransformer(fewer, dist.group.WORLD, seed=4).eval(), _pixels(2))
    dtype = torch.float64 if rank == 1 else torch.float32
    other = DataParallelEncoder(SiglipVisionTransformer(config, seed=4, dtype=dtype).eval(), dist.group.WORLD)
    outcomes[("data", "dtype of the model differs")] = _outcome(other, _pixels(2))
    outcomes[("tensor", "still in step after split")] = _outcome(models["tensor"], _pixels(5, seed=9))
    pixels, _, _ = _cases(rank, world_size)["NaN on rank 1"]
    failure = ValueError("rank 1 failed") if rank == 1 else None
    outcomes["cycles"] = _exceptions_left_in_cycles(lambda: models["tensor"](pixels)) + _exceptions_left_in_cycles(
        lambda: agree_on_failure(failure, dist.group.WORLD)
    )
    return outcomes


@pytest.fixture(scope="module")
def reference():
    from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer

    model = SiglipVisionTransformer(SiglipVisionConfig(**CONFIG), seed=4).eval()
    with torch.inference_mode():
        cases = {"two": (2, 0), "three": (3, 5), "five": (5, 9)}
        return {name: model(_pixels(b, seed=s)).pooler_output for name, (b, s) in cases.items()}


def _errors(ranks: list[dict], key: tuple) -> list[tuple]:
    return [(r[key]["error"], r[key].get("message", "")) for r in ranks]


def _assert_every_rank_refuses(ranks: list[dict], key: tuple, *fragments: str) -> None:
    for rank, (error, message) in enumerate(_errors(ranks, key)):
        assert error == "ValueError", (key, rank, error, message)
        assert "every rank must pass the same" in message and f"this is rank {rank} of {len(ranks)}" in message
        for fragment in fragments:
            assert fragment in message, (key, rank, message)


def _check_world(ranks: list[dict], reference: dict) -> None:
    world = len(ranks)
    last = world - 1
    for mode in ("tensor", "data"):
        _assert_every_rank_refuses(ranks, (mode, "batch 1 vs 24"), "pixel_values shape differs across ranks",
                                   "rank 0 (1, 3, 32, 32)", "(24, 3, 32, 32)", "rank 1" if world == 2 else "ranks [1, 2]")
        _assert_every_rank_refuses(ranks, (mode, "batch 1 vs 2"), "rank 0 (1, 3, 32, 32)")
        _assert_every_rank_refuses(ranks, (mode, "only the last rank differs"),
                                   f"rank {last} (3, 3, 32, 32)", f"{'rank 0' if world == 2 else 'ranks [0, 1]'} (2, 3, 32, 32)")
        _assert_every_rank_refuses(ranks, (mode, "dtype"), "pixel_values dtype differs", "rank 1 torch.float64")
        _assert_every_rank_refuses(ranks, (mode, "output_hidden_states"), "output_hidden_states differs", "rank 1 True")
        _assert_every_rank_refuses(ranks, (mode, "interpolate_pos_encoding"), "interpolate_pos_encoding differs")
        _assert_every_rank_refuses(ranks, (mode, "values differ, checksum"), "pixel_values checksum differs")
        _assert_every_rank_refuses(ranks, (mode, "images swapped, checksum"), "pixel_values checksum differs")
        _assert_every_rank_refuses(ranks, (mode, "mode differs"), "pixel_values checksum differs", "<not given>")
        # a rank whose own input fails raises its own error; the others name it
        for case, own_error, own_text in [
            ("NaN on rank 1", "ValueError", "1 NaN or infinite"),
            ("not a tensor on rank 1", "TypeError", "must be a torch.Tensor"),
            ("unknown keyword on rank 1", "TypeError", "bogus"),
            ("return_dict 0 on rank 1", "TypeError", "return_dict must be a bool or None, got 0"),
        ]:
            errors = _errors(ranks, (mode, case))
            assert errors[1][0] == own_error and own_text in errors[1][1] and "rank" not in errors[1][1], errors[1]
            for rank in set(range(world)) - {1}:
                error, message = errors[rank]
                assert error == "ValueError" and "input check failed on rank(s) [1]" in message, (case, message)
                assert own_text in message and f"this is rank {rank} of {world}" in message
        # different pixels of one shape are only caught by the checksum (documented): here they run
        assert all(r[(mode, "values differ, shapes only")]["error"] is None for r in ranks)
        for r in ranks:
            torch.testing.assert_close(r[(mode, "same inputs, checksum")]["pooler"], reference["two"], atol=1e-5, rtol=0)
            torch.testing.assert_close(r[(mode, "still in step")]["pooler"], reference["five"], atol=1e-5, rtol=0)
    _check_split(ranks, reference)
    _assert_every_rank_refuses(ranks, ("tensor", "layers differ"), "model loaded differs", "rank 1 'torch.float32, 1 layers")
    _assert_every_rank_refuses(ranks, ("data", "dtype of the model differs"), "model loaded differs", "rank 1 'torch.float64")
    assert [r["cycles"] for r in ranks] == [[]] * world, "a raised error was left in a reference cycle"
    slowest = max(outcome["seconds"] for r in ranks for key, outcome in r.items() if key != "cycles")
    assert slowest < 20, f"a case took {slowest:.1f} s: a rank waited instead of failing at once"


def _check_split(ranks: list[dict], reference: dict) -> None:
    """A split batch gives each rank its rows; a bad split fails on every rank at once, naming what is wrong."""
    world = len(ranks)
    sizes = [2] + [0] * (world - 2) + [1]
    for rank, r in enumerate(ranks):
        first = sum(sizes[:rank])
        torch.testing.assert_close(r[("split", "rows")]["pooler"], reference["three"][first : first + sizes[rank]], atol=1e-5, rtol=0)
        torch.testing.assert_close(r[("tensor", "still in step after split")]["pooler"], reference["five"], atol=1e-5, rtol=0)
    errors = _errors(ranks, ("split", "rank 0 passes 3 rows"))
    assert errors[0][0] == "ValueError" and "batch_sizes[0] is 2 but this rank passed 3" in errors[0][1], errors[0]
    assert all(e == "ValueError" and "input check failed on rank(s) [0]" in m for e, m in errors[1:]), errors
    _assert_every_rank_refuses(ranks, ("split", "lists differ"), "batch_sizes differs across ranks")
    _assert_every_rank_refuses(ranks, ("split", "only rank 1 splits"), "batch_sizes differs across ranks", "rank 1 (")
    for case, text in [("one count too many", "one row count per rank"), ("no image at all", "holds no image"),
                       (None, "a DataParallelEncoder splits each batch itself")]:
        key = ("data", "batch_sizes") if case is None else ("split", case)
        assert all(e == "ValueError" and text in m for e, m in _errors(ranks, key)), _errors(ranks, key)


def test_ranks_agree_or_all_fail_two_ranks(tmp_path, reference):
    _check_world(run_ranks(2, tmp_path, _every_case), reference)


def test_ranks_agree_or_all_fail_three_ranks(tmp_path, reference):
    _check_world(run_ranks(3, tmp_path, _every_case), reference)


def test_without_a_group_only_the_local_check_runs():
    def refuse():
        raise ValueError("refused here")

    with pytest.raises(ValueError, match="refused here"):
        agree_on_inputs(None, refuse)
    with pytest.raises(ValueError, match="check_inputs_agree 'all' is not one of"):
        agree_on_inputs(None, dict, mode="all")
    assert agree_on_inputs(None, lambda: {"x": 1}) == {"x": 1}


def test_checksum_sees_any_changed_value_and_image_order():
    pixels = _pixels(3)
    assert tensor_checksum(pixels) == tensor_checksum(pixels.clone())
    assert tensor_checksum(pixels) == tensor_checksum(pixels.transpose(2, 3).contiguous().transpose(2, 3))
    changed = pixels.clone()
    changed[2, 1, 5, 7] = torch.nextafter(changed[2, 1, 5, 7], torch.tensor(10.0))  # one ulp
    assert tensor_checksum(changed) != tensor_checksum(pixels)
    assert tensor_checksum(pixels[[1, 0, 2]]) != tensor_checksum(pixels)
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.bool, torch.uint8):
        assert isinstance(tensor_checksum(pixels.to(dtype)), int)


def test_signature_names_fields_and_stays_within_a_status_row():
    text = input_signature({"pixel_values": _pixels(2), "output_hidden_states": False})
    assert text == "pixel_values shape\t(2, 3, 32, 32)\npixel_values dtype\ttorch.float32\noutput_hidden_states\tFalse"
    long_a = input_signature({f"flag_{i}": i for i in range(200)})
    long_b = input_signature({**{f"flag_{i}": i for i in range(200)}, "flag_199": -1})
    assert len(long_a.encode()) <= 1023 and long_a != long_b  # the digest sees past the cut
    message = _input_verdict([(False, long_a), (False, long_b)], group=None)
    assert "signature digest differs across ranks" in message and "this is rank 0 of 2" in message
