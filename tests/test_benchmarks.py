"""Smoke tests of the benchmark scripts (benchmarks/): the pieces run on a tiny model, in process.

What could break without anyone running the (long) benchmarks: the options and section plan, the
rebuilt "three GEMMs" attention of the fused q/k/v benchmark (it must compute what the fused model
computes, for a whole model and for one rank's shard of heads), the rank commands, and the table. Rank
commands run in this process through a stand-in group of one rank (spawned rank groups are left to
``bench.py --quick``: a spawn costs seconds). No timing is asserted.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer
from tp_siglip.model import SiglipAttention
from tp_siglip.parallel import TensorParallelPlan

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import fused_qkv  # noqa: E402
from benchmarks.common import Geometry, outputs_of  # noqa: E402
from benchmarks.options import parse_options  # noqa: E402
from benchmarks.table import COLUMNS, markdown  # noqa: E402

TINY = Geometry("tiny", hidden=64, intermediate=96, layers=2, heads=4, patch=8, image=32)


class LocalGroup:
    """A `RankGroup` stand-in: one rank, this process."""

    def __init__(self) -> None:
        self.state = {"rank": 0, "world": 1, "device": torch.device("cpu")}

    def call(self, command, *args):
        return [command(self.state, *args)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny tower saved under transformers' names (by our own model: no transformers import,
    which would cost seconds); every tensor perturbed, so q, k and v biases differ too."""
    config = SiglipVisionConfig(**TINY.hf_config())
    model = SiglipVisionTransformer(config, seed=0)
    tensors = dict(model.state_dict())
    # at one rank the head's fused in_proj is the whole checkpoint tensor; taken from the layer itself because
    # state_dict() (at bf06af1) keeps only the last of its three same-named blocks
    in_proj = model.head.attention.in_proj
    tensors["head.attention.in_proj_weight"], tensors["head.attention.in_proj_bias"] = in_proj.weight, in_proj.bias
    gen = torch.Generator().manual_seed(1)
    tensors = {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in sorted(tensors.items())}
    directory = tmp_path_factory.mktemp("bench") / "tiny"
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", **TINY.hf_config()}))
    return directory


def test_options_default_sections_and_fused_plan() -> None:
    opts, _ = parse_options([])
    assert opts.sections == ("throughput", "scaling", "memory")
    assert [g.label for g in opts.fused_geometries] == ["base-224", "so400m-384 (4L)"]
    assert opts.fused_batch == 8
    quick, _ = parse_options(["--quick", "--only", "fused"])
    assert quick.sections == ("fused",)
    assert [g.layers for g in quick.fused_geometries] == [2, 1] and quick.fused_batch == 2
    with pytest.raises(SystemExit):
        parse_options(["--only", "nonsense"])


def test_three_gemm_attention_matches_the_fused_model(tiny_checkpoint: Path) -> None:
    group = LocalGroup()
    fused_qkv.fused_load_command(group.state, str(tiny_checkpoint), "fp32")
    model, variants = group.state["model"], group.state["variants"]
    three = variants["three"][0]
    weights = [three.q_weight, three.k_weight, three.v_weight]
    assert all(w.is_contiguous() for w in weights)
    assert len({w.data_ptr() for w in weights} | {model.encoder.layers[0].self_attn.qkv_proj.weight.data_ptr()}) == 4
    x = torch.randn(2, 3, TINY.image, TINY.image, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        found = {}
        for name in fused_qkv.VARIANTS:
            fused_qkv.use_variant(model, variants, name)
            assert all(type(layer.self_attn) is type(variants[name][0]) for layer in model.encoder.layers)
            found[name] = outputs_of(model(x))
    for key in found["fused"]:
        torch.testing.assert_close(found["three"][key], found["fused"][key], rtol=1e-5, atol=1e-5)


def test_fused_cell_rows_in_process(tiny_checkpoint: Path) -> None:
    opts, _ = parse_options(["--quick", "--only", "fused"])
    geometry = replace(TINY)
    group = LocalGroup()
    fused_qkv.fused_load_command(group.state, str(tiny_checkpoint), "fp32")
    rows = fused_qkv._fused_cell(opts, group, "local", geometry, "fp32")
    assert [r.section for r in rows] == ["fused", "fused"]
    forward, gemm = rows
    assert forward.data["max_abs_diff"] <= 1e-5 * max(forward.data["output_scale"], 1.0)
    assert forward.data["img_s"]["fused"] > 0 and gemm.data["gflops"]["three"] > 0
    assert gemm.data["shape"] == [opts.fused_batch * TINY.tokens, TINY.hidden, 3 * TINY.hidden]
    table = markdown(rows).splitlines()
    assert len(table) == 4 and all(line.count("|") == len(COLUMNS) + 1 for line in table)


@pytest.mark.parametrize("rank", [0, 2])
def test_three_gemm_attention_on_a_tensor_parallel_shard(rank: int) -> None:
    """Rank ``rank`` of 3 over 4 heads (2/1/1 heads): the q/k/v blocks are split by the layer's own spans.
    Without a group the row-parallel all-reduce is the identity, so both give this rank's partial sum."""
    config = SiglipVisionConfig(**TINY.hf_config())
    plan = TensorParallelPlan(None, 3, rank, TINY.heads, TINY.hidden // TINY.heads, TINY.intermediate)
    fused = SiglipAttention(config, plan)
    gen = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for param in fused.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    three = fused_qkv.ThreeGemmAttention(fused)
    local = plan.head_columns[1] - plan.head_columns[0]
    assert three.q_weight.shape == (local, TINY.hidden) and three.v_bias.shape == (local,)
    x = torch.randn(2, TINY.tokens, TINY.hidden, generator=gen)
    with torch.inference_mode():
        torch.testing.assert_close(three(x), fused(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- every script still imports


SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def _project_imports(path: Path) -> list[tuple[str, str, int]]:
    """``(module, name, line)`` of every ``from tp_siglip... / benchmarks... import name`` in ``path``, also
    the ones inside functions (a script imports what it needs where it needs it, and those rot unseen)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in {"tp_siglip", "benchmarks"}:
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name.split(".")[0] in {"tp_siglip", "benchmarks"}]
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_benchmark_script_imports_and_finds_its_names(script: Path) -> None:
    import importlib

    importlib.import_module(f"benchmarks.{script.stem}")
    missing = []
    for module_name, name, line in _project_imports(script):
        module = importlib.import_module(module_name)
        if name and not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ImportError:
                missing.append(f"line {line}: {module_name}.{name}")
    assert not missing, f"{script.name} imports names that no longer exist: {missing}"


def test_the_import_check_sees_a_renamed_function(tmp_path: Path) -> None:
    script = tmp_path / "old.py"
    script.write_text("def main():\n    from tp_siglip.parallel import _all_gather_flat\n")
    assert _project_imports(script) == [("tp_siglip.parallel", "_all_gather_flat", 2)]
    assert not hasattr(__import__("tp_siglip.parallel", fromlist=["x"]), "_all_gather_flat")
