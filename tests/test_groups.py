"""Process groups: torchrun-style launch, failures on one rank, the caller's subgroups, data mode."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from checkpoints import TINY, save_layout, vision_model
from distributed import run_ranks

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    reference = vision_model(TINY, seed=11)
    other = vision_model(TINY, seed=12)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    save_file({"pixels": pixels}, str(root / "inputs.safetensors"))
    with torch.no_grad():
        refs = {
            "a": reference(pixels, output_hidden_states=True),
            "b": other(pixels, output_hidden_states=True),
        }
    return root, save_layout(reference, "v5_vision", root / "a"), save_layout(other, "sharded", root / "b"), refs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(rank: int, world_size: int, port: int, ckpt: Path, out: Path, inputs: Path) -> subprocess.Popen:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", TP_SIGLIP_PG_TIMEOUT_S="60")
    return subprocess.Popen([sys.executable, str(HERE / "rank_main.py"), str(ckpt), str(out), str(inputs)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_torchrun_style_launch_creates_the_group(tiny, tmp_path):
    """RANK/WORLD_SIZE/MASTER_* set, no group: from_pretrained creates one (gloo) and every rank agrees."""
    root, ckpt, _, refs = tiny
    port = _free_port()
    procs = [_launch(r, 2, port, ckpt, tmp_path / f"out{r}.safetensors", root / "inputs.safetensors") for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    for r in range(2):
        out = load_file(str(tmp_path / f"out{r}.safetensors"))["pooler_output"]
        torch.testing.assert_close(out, refs["a"].pooler_output, atol=1e-4, rtol=0)



class _GroupMade(Exception):
    """Raised by the stand-in for ``init_process_group``: the test only asks which backend was chosen."""


def _backend_chosen(monkeypatch, start) -> tuple[str, list[int]]:
    """On a machine that has CUDA (``is_available`` faked), under torchrun's variables: the backend the default
    group is made with when ``start()`` makes it, and the GPUs ``set_device`` was called with."""
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    made, devices = [], []

    def init_process_group(backend=None, **kwargs):
        made.append(backend)
        raise _GroupMade

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(_GroupMade):
        start()
    return made[0], devices


def test_a_cpu_model_on_a_gpu_machine_gets_a_gloo_group(monkeypatch, tmp_path):
    """from_pretrained(device="cpu", world_size=2) on a machine with GPUs: the group it creates is gloo (an NCCL
    group cannot sum the CPU model's activations); device="cuda" (or the default there) gets NCCL."""
    from tp_siglip import SiglipVisionTransformer

    cpu = _backend_chosen(monkeypatch, lambda: SiglipVisionTransformer.from_pretrained(tmp_path, world_size=2, device="cpu"))
    assert cpu == ("gloo", [])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu = _backend_chosen(monkeypatch, lambda: SiglipVisionTransformer.from_pretrained(tmp_path, world_size=2, device="cuda"))
    assert gpu == ("nccl", [0])


def test_the_encode_job_with_device_cpu_on_a_gpu_machine_gets_a_gloo_group(monkeypatch):
    """``torchrun ... tp-siglip encode --device cpu --tp 2`` on a machine with GPUs: the default group is gloo, as
    the model is on the CPU; without --device (the GPU there) it is NCCL."""
    import argparse
    from types import SimpleNamespace

    from tp_siglip import encode

    for device, expected in (("cpu", ("gloo", [])), (None, ("nccl", [0]))):
        checked = SimpleNamespace(device=device, tp=2)
        monkeypatch.setattr(encode, "check_arguments", lambda args, rank, world_size, checked=checked: checked)
        assert _backend_chosen(monkeypatch, lambda device=device: encode.run(argparse.Namespace(device=device))) == expected


def test_a_failing_rank_does_not_leave_the_other_hanging(tiny, tmp_path):
    """Two ranks started by hand (no torchrun agent to kill survivors); rank 1 gets a truncated file.
    Both must fail promptly, and the healthy rank must say which rank failed and why."""
    root, ckpt, _, _ = tiny
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    data = (ckpt / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    port = _free_port()
    start = time.monotonic()
    procs = [
        _launch(0, 2, port, ckpt, tmp_path / "o0.safetensors", root / "inputs.safetensors"),
        _launch(1, 2, port, broken, tmp_path / "o1.safetensors", root / "inputs.safetensors"),
    ]
    errors = [p.communicate(timeout=50)[1] for p in procs]
    elapsed = time.monotonic() - start
    assert [p.returncode for p in procs] == [3, 3], errors
    assert "rank(s) [1]" in errors[0] and "truncated" in errors[0] and "broken/model.safetensors" in errors[0]
    assert "CheckpointError" in errors[1] and "truncated" in errors[1]
    assert elapsed < 45, f"took {elapsed:.0f} s: the healthy rank waited for a timeout"


def _too_many_ranks(rank, world_size, ckpt):
    from tp_siglip import SiglipVisionTransformer

    with pytest.raises(ValueError, match="world_size 3 is larger than num_attention_heads 2"):
        SiglipVisionTransformer.from_pretrained(ckpt, world_size=3)
    with pytest.raises(ValueError, match="world_size=2 but the process group has 3 ranks"):
        SiglipVisionTransformer.from_pretrained(ckpt, world_size=2)


def test_more_ranks_than_heads_is_refused_on_every_rank(tmp_path):
    ckpt = save_layout(vision_model({**TINY, "num_attention_heads": 2}, seed=1), "v5_vision", tmp_path / "two")
    run_ranks(3, tmp_path, _too_many_ranks, str(ckpt))


def _subgroups(rank, world_size, pixels, ckpt_a, ckpt_b):
    from tp_siglip import SiglipVisionTransformer

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    ckpt = ckpt_a if rank < 2 else ckpt_b
    model = SiglipVisionTransformer.from_pretrained(ckpt, process_group=mine)
    assert model.world_size == 2 and model.rank == rank % 2
    if rank >= 2:
        pixels = pixels[:3]  # the groups run different work: any use of the default group would hang or mix
    with torch.inference_mode():
        out = model(pixels, output_hidden_states=True)
    return {"pooler": out.pooler_output, "last": out.last_hidden_state}


def test_caller_subgroups_run_independently(tiny):
    """4 ranks split into two groups of 2, each loading its own checkpoint and running its own batch."""
    root, a, b, refs = tiny
    pixels = load_file(str(root / "inputs.safetensors"))["pixels"]
    outs = run_ranks(4, root, _subgroups, pixels, str(a), str(b))
    for rank, out in enumerate(outs):
        ref = refs["a"] if rank < 2 else refs["b"]
        n = 5 if rank < 2 else 3
        torch.testing.assert_close(out["pooler"], ref.pooler_output[:n], atol=1e-4, rtol=0)
        torch.testing.assert_close(out["last"], ref.last_hidden_state[:n], atol=1e-4, rtol=0)


def _data_vs_tensor(rank, world_size, pixels, ckpt):
    from tp_siglip import SiglipVisionTransformer

    outs = {}  # batch 5 over 2 ranks: 3 + 2
    for mode in ("tensor", "data"):
        model = SiglipVisionTransformer.from_pretrained(ckpt, world_size=world_size, parallel=mode)
        assert model.parallel == mode
        with torch.inference_mode():
            out = model(pixels, output_hidden_states=True)
            outs[mode] = {"pooler": out.pooler_output, "last": out.last_hidden_state,
                          **{f"h{i}": h for i, h in enumerate(out.hidden_states)}}
            one = model(pixels[:1])  # fewer images than ranks: one rank has nothing to do
            outs[mode]["one"] = one.pooler_output
            last, pooler = model(pixels, return_dict=False)  # transformers' tuple: unpacking gives tensors
            outs[mode]["tuple"] = torch.stack([pooler, last[:, 0]])
    return {f"{m}.{k}": v for m, d in outs.items() for k, v in d.items()}


def test_data_mode_equals_tensor_mode_and_transformers(tiny):
    root, ckpt, _, refs = tiny
    pixels = load_file(str(root / "inputs.safetensors"))["pixels"]
    ref = refs["a"]
    for out in run_ranks(2, root, _data_vs_tensor, pixels, str(ckpt)):
        for mode in ("tensor", "data"):
            torch.testing.assert_close(out[f"{mode}.pooler"], ref.pooler_output, atol=1e-4, rtol=0)
            torch.testing.assert_close(out[f"{mode}.last"], ref.last_hidden_state, atol=1e-4, rtol=0)
            torch.testing.assert_close(out[f"{mode}.one"], ref.pooler_output[:1], atol=1e-4, rtol=0)
            expected = torch.stack([ref.pooler_output, ref.last_hidden_state[:, 0]])
            torch.testing.assert_close(out[f"{mode}.tuple"], expected, atol=1e-4, rtol=0)
            for i, h in enumerate(ref.hidden_states):
                torch.testing.assert_close(out[f"{mode}.h{i}"], h, atol=1e-4, rtol=0)
        torch.testing.assert_close(out["data.pooler"], out["tensor.pooler"], atol=2e-5, rtol=0)


def test_local_rank_past_the_gpus_this_process_sees(monkeypatch):
    """A launcher that gives each process its own GPU (CUDA_VISIBLE_DEVICES) leaves LOCAL_RANK 3 with one GPU
    visible: the rank's GPU is cuda:0, for the default device, --device cuda and the default group alike."""
    from tp_siglip import encode_checks
    from tp_siglip.loader import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(None) == torch.device("cuda", 0)
    assert encode_checks._check_device("cuda", world_size=2) == "cuda:0"
    devices: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)


    def init_process_group(**kwargs):
        raise _GroupMade  # the GPU is chosen before the group is made

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    from tp_siglip.parallel import init_default_group

    with pytest.raises(_GroupMade):
        init_default_group("nccl")
    assert devices == [0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # torchrun's usual case: every GPU visible
    assert resolve_device(None) == torch.device("cuda", 3)
