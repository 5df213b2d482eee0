"""The command line (``tp-siglip encode`` / ``tp-siglip env``), the CPU dtype policy, and the main job on a
real-looking corpus: bad files skipped in lockstep, argument errors before the model loads, atomic and
resumable output.

Runs call ``main()`` in this process (no subprocess: each costs seconds), on one tiny checkpoint built once.
The embeddings are checked against transformers on the same weights and files. Two ranks are spawned once
(a `RankPool`) for the tests that need a process group.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tp_siglip import SiglipVisionTransformer, __version__, cli, embeddings_dir, embeddings_file, encode, encode_checks, hardware

from checkpoints import TINY, save_layout, transformers_outputs, vision_model
from corpus import BAD, GOOD, HIDDEN, IGNORED, LISTED, make_corpus
from distributed import RankPool, encode_main_captured

CONFIG = {**TINY, "image_size": 32, "patch_size": 8}
TOLERANCE = 2e-3


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint, a corpus, and transformers' embeddings of every good file of the corpus."""
    root = tmp_path_factory.mktemp("cli")
    model = vision_model(CONFIG, seed=11)
    checkpoint = save_layout(model, "v5_vision", root / "checkpoint")
    corpus = make_corpus(root / "corpus")
    out = transformers_outputs(model, [corpus / name for name in GOOD], CONFIG["image_size"])
    unit = torch.nn.functional.normalize(out.pooler_output, dim=-1)  # the stored embedding is L2-normalised
    reference = {str(corpus / name): row for name, row in zip(GOOD, unit)}
    return root, checkpoint, corpus, reference


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = encode.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (safe_open is not iterable)


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if "error:" in line]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model gets loaded (argument errors must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(encode, "_load_model", refuse)


# ----------------------------------------------------------------------------- the CPU dtype policy


X86_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n"
X86_BF16 = "processor\t: 0\nmodel name\t: Intel Xeon 8480+\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
X86_FP16 = "processor\t: 0\nmodel name\t: Intel Xeon 6980P\nflags\t\t: avx2 avx512f avx512_fp16 amx_fp16\n"
ARM_BF16 = "processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd fphp asimdhp bf16 sve\nCPU part\t: 0xd40\n"
ARM_OLD = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """``fake_cpu(text)`` makes /proc/cpuinfo read ``text`` (None: no such file) and re-arms the one warning."""

    def use(text):
        path = tmp_path / "cpuinfo"
        if text is None:
            path = tmp_path / "missing"
        else:
            path.write_text(text)
        monkeypatch.setattr(hardware, "CPUINFO", path)
        monkeypatch.setattr(hardware, "_warned", False)
        hardware.cpu_info.cache_clear()

    yield use
    hardware.cpu_info.cache_clear()


@pytest.mark.parametrize(
    "text, bf16, fp16",
    [(X86_AVX2, False, False), (X86_BF16, True, False), (X86_FP16, False, True), (ARM_BF16, True, True), (ARM_OLD, False, False)],
    ids=["avx2", "avx512_bf16", "avx512_fp16", "arm-bf16", "arm-old"],
)
def test_cpu_flags(fake_cpu, text, bf16, fp16):
    fake_cpu(text)
    assert hardware.cpu_has_native_bf16() is bf16
    assert hardware.cpu_has_native_fp16() is fp16


def test_cpu_flags_without_proc_cpuinfo_ask_torch(fake_cpu, monkeypatch):
    fake_cpu(None)
    assert hardware.cpu_info().flags is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert hardware.cpu_has_native_bf16() is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert hardware.cpu_has_native_bf16() is False


def test_this_machines_flags_are_read():
    hardware.cpu_info.cache_clear()
    flags = set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                flags = set(line.split(":", 1)[1].split())
                break
    if not flags:
        pytest.skip("no flags line in /proc/cpuinfo on this machine")
    assert hardware.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def test_emulated_half_warns_once_naming_dtype_cpu_cost_and_fix(fake_cpu, caplog):
    fake_cpu(X86_AVX2)
    with caplog.at_level(logging.WARNING, logger="tp_siglip.hardware"):
        assert hardware.warn_if_emulated_half(torch.device("cpu"), torch.float32) is False
        assert hardware.warn_if_emulated_half("cuda", torch.bfloat16) is False  # not a CPU
        assert hardware.warn_if_emulated_half(torch.device("cpu"), torch.bfloat16) is True
        assert hardware.warn_if_emulated_half(torch.device("cpu"), torch.bfloat16) is False  # once per process
        assert hardware.warn_if_emulated_half(torch.device("cpu"), torch.float16) is False
    assert len(caplog.records) == 1, caplog.text
    message = caplog.records[0].getMessage()
    for part in ("bfloat16", "AMD EPYC 7B12", "avx512_bf16", "7x slower", "--dtype float32", "dtype=torch.float32"):
        assert part in message, message


def test_native_half_does_not_warn(fake_cpu, caplog):
    fake_cpu(X86_BF16)
    with caplog.at_level(logging.WARNING, logger="tp_siglip.hardware"):
        assert hardware.warn_if_emulated_half(torch.device("cpu"), torch.bfloat16) is False
        assert hardware.warn_if_emulated_half(torch.device("cpu"), torch.float16) is True  # no fp16 on that CPU
    assert "float16" in caplog.text and "could not tell" not in caplog.text


def test_encode_warns_about_emulated_bf16(setup, fake_cpu, tmp_path, capsys, caplog):
    _, checkpoint, corpus, _ = setup
    fake_cpu(X86_AVX2)
    with caplog.at_level(logging.WARNING, logger="tp_siglip.hardware"):
        code, _, err = _run(["--model", checkpoint, corpus / GOOD[0], "--output", tmp_path / "o.safetensors", "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    assert [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()], caplog.text
    _, meta = _read(tmp_path / "o.safetensors")
    assert meta["dtype"] == "bfloat16"


def test_from_pretrained_warns_about_emulated_bf16(tiny_checkpoint, fake_cpu, caplog):
    """The library call itself warns (once), not only the command."""
    fake_cpu(X86_AVX2)
    with caplog.at_level(logging.WARNING, logger="tp_siglip.hardware"):
        SiglipVisionTransformer.from_pretrained(tiny_checkpoint[1], dtype="bf16")
        SiglipVisionTransformer.from_pretrained(tiny_checkpoint[1], dtype="float32")
    assert len([r for r in caplog.records if "7x slower" in r.getMessage()]) == 1, caplog.text


# ----------------------------------------------------------------------------- tp-siglip env, --help, --version


def test_env_report(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example:8080")
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_print_me")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    lines = dict(line[2:].split(": ", 1) for line in out.splitlines())
    assert lines["tp-siglip"].startswith(__version__)
    assert lines["Python"].startswith(platform.python_version())
    assert lines["torch"] == torch.__version__
    for package in ("huggingface_hub", "safetensors", "pydantic", "numpy", "transformers"):
        assert lines[package] == metadata.version(package)
    assert lines["Hugging Face cache"] == str(tmp_path / "hub-cache")
    assert lines["HF_ENDPOINT"] == "http://hub.example:8080"
    assert lines["HF_HUB_OFFLINE"] == "unset"
    assert lines["HF_TOKEN"] == "set (not shown)" and "hf_do_not_print_me" not in out
    assert lines["native bf16 on CPU"] == ("yes" if hardware.cpu_has_native_bf16() else "no (emulated: use float32)")
    assert lines["CUDA build"] == (torch.version.cuda or "none (CPU-only torch)")
    assert hardware.cpu_info().model in lines["CPU"]


def test_help_shows_every_default(capsys):
    for parser in (encode.build_parser("tp-siglip encode"), cli.build_parser()._subparsers._group_actions[0].choices["encode"]):
        formatter = parser.formatter_class(prog="x")
        for action in parser._actions:
            if action.dest != "help" and action.help != "==SUPPRESS==":  # --parallel: gone, refused
                assert "default" in formatter._get_help_string(action), action.dest
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["encode", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 8)", "(default: google/siglip-base-patch16-224)", "(default: embeddings.safetensors)",
                  "(default: 10000)", "(default: auto)", "(default: float32)", "bundled photos"):
        assert shown in text, shown


def test_module_usage_names_the_module_not_encode_py():
    """``python -m tp_siglip.encode`` (and torchrun -m) runs with ``sys.argv[0]`` = .../encode.py: its usage must say how
    it was run, not ``usage: encode.py``."""
    env = {**os.environ, "PYTHONPATH": str(Path(encode.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "tp_siglip.encode", "--batch-size", "0"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("usage: python -m tp_siglip.encode [-h]"), proc.stderr
    assert "python -m tp_siglip.encode: error: argument --batch-size: expected a positive integer, got 0" in proc.stderr


def test_both_encode_commands_show_the_same_help():
    """``tp-siglip encode --help`` and ``python -m tp_siglip.encode --help`` describe the job alike, in plain words (no
    docstring markup), and say what the exit statuses mean."""
    sub = cli.build_parser()._subparsers._group_actions[0].choices["encode"]
    texts = [parser.format_help() for parser in (sub, encode.build_parser(sub.prog))]
    assert texts[0] == texts[1]
    assert "``" not in texts[0] and encode.DESCRIPTION.split(",")[0] in " ".join(texts[0].split())
    assert "exit status: 0 done, 1 failed while running, 2 bad arguments, 130 interrupted" in texts[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tp-siglip {__version__}"


# ----------------------------------------------------------------------------- errors before the model loads


@pytest.mark.parametrize(
    "case",
    ["parallel-is-gone", "save-every-is-gone", "output-is-folder", "output-folder-is-file", "output-npy", "output-image-name", "output-folder-not-a-run", "revision-of-a-folder", "missing-parent", "parent-is-file", "unwritable", "missing-input", "no-images",
     "shards-in-a-folder", "device-cuda", "bad-device", "model-not-found", "model-no-config", "model-is-file"],
)
def test_argument_errors_exit_2_before_loading(setup, case, tmp_path, capsys, no_model_load):
    _, checkpoint, corpus, _ = setup
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "img_emb_00000.npy").write_bytes(b"x")  # e.g. another run's img_emb/
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"")  # a folder is searched for images, not shards
    argv = {"--model": checkpoint, "--output": tmp_path / "out.safetensors", "inputs": [corpus]}
    named = {
        "output-is-folder": ("--output", tmp_path / "dir.safetensors"),  # a .safetensors name that is a folder
        "output-folder-is-file": ("--output", tmp_path / "file"),  # any other name is a folder of shards
        "parallel-is-gone": ("--parallel", "data"),  # one knob now: --tp
        "save-every-is-gone": ("--save-every", "60"),  # commits are per shard now: --shard-size
        "output-npy": ("--output", tmp_path / "emb.npy"),  # a file suffix the job does not write: refused
        "output-image-name": ("--output", tmp_path / "emb.PNG"),
        "output-folder-not-a-run": ("--output", tmp_path / "busy"),
        "revision-of-a-folder": ("--revision", "v1"),  # --model is a local folder: --revision means nothing  # a folder output goes in a new or empty folder
        "missing-parent": ("--output", tmp_path / "no" / "such" / "out.safetensors"),
        "parent-is-file": ("--output", tmp_path / "file" / "out.safetensors"),
        "unwritable": ("--output", Path("/proc/tp-siglip-test.safetensors")),
        "missing-input": ("inputs", [corpus, tmp_path / "nowhere"]),
        "no-images": ("inputs", [tmp_path / "empty"]),
        "shards-in-a-folder": ("inputs", [tmp_path / "shards"]),
        "device-cuda": ("--device", "cuda"),
        "bad-device": ("--device", "graphics-card"),
        "model-not-found": ("--model", tmp_path / "no" / "such" / "model"),
        "model-no-config": ("--model", tmp_path / "empty"),
        "model-is-file": ("--model", tmp_path / "file"),
    }
    key, value = named[case]
    if case == "device-cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if case == "unwritable" and (not Path("/proc").is_dir() or (os.access("/proc", os.W_OK) and _can_create_in("/proc"))):
        pytest.skip("no unwritable /proc here")
    argv[key] = value
    inputs = argv.pop("inputs")
    code, out, err = _run([*(inputs if isinstance(inputs, list) else [inputs]), *(x for kv in argv.items() for x in kv)], capsys)
    assert code == 2, (out, err)
    errors = _error_lines(err)
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    shown = str(value[-1] if isinstance(value, list) else value)
    assert shown in errors[0] or (case == "unwritable" and "/proc" in errors[0]), errors[0]
    if case == "device-cuda":
        assert "--device cpu" in errors[0]
    if case == "parallel-is-gone":
        assert "--tp N" in errors[0] and "--tp 1" in errors[0]
    if case == "shards-in-a-folder":
        assert ".tar: 1" in errors[0] and "name its shards (e.g. DIR/*.tar," in errors[0]
    if case == "save-every-is-gone":
        assert "--shard-size" in errors[0]
    if case in ("output-npy", "output-image-name"):
        assert not value.exists()  # no folder named emb.npy
        assert "emb.safetensors" in errors[0] and "folder without a file suffix" in errors[0]
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(("module", "extra", "output"), [("pyarrow", "corpus", "emb"), ("PIL", "images", "emb.safetensors")])
def test_a_missing_optional_dependency_is_exit_2_before_loading(setup, module, extra, output, tmp_path, capsys, monkeypatch,
                                                               no_model_load):
    """Without pyarrow a folder output (parquet metadata) is refused like a missing Pillow: one line naming the pip
    command, exit 2, before the model loads and before the output folder is made."""
    _, checkpoint, corpus, _ = setup
    monkeypatch.setitem(sys.modules, module, None)  # `import pyarrow` / `from PIL import Image` now raise ImportError
    if module == "PIL":
        monkeypatch.setitem(sys.modules, "PIL.Image", None)
    code, out, err = _run([corpus, "--model", checkpoint, "--output", tmp_path / output], capsys)
    assert code == 2, (out, err)
    (line,) = _error_lines(err)
    assert f'pip install "tp-siglip[{extra}]"' in line, line
    assert not (tmp_path / output).exists()


class _Gpu:
    total_memory = 10**9  # a 1 GB GPU


@pytest.mark.parametrize(("device", "gpu_bytes", "expected"), [("cpu", 10**9, 1), ("cuda", 80 * 10**9, 1), ("cuda", 10**9, 4)])
def test_default_tp_is_data_parallel_unless_the_gpu_is_too_small(tmp_path, monkeypatch, device, gpu_bytes, expected):
    """so400m's weights (~1.7 GB in float32) take more than half of a 1 GB GPU: the default --tp is then the
    smallest divisor of the world, within a node of 8 GPUs, whose slices fit (4); else 1."""
    from argparse import Namespace

    config = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
              "image_size": 384, "patch_size": 14, "model_type": "siglip_vision_model"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _device: type("Gpu", (), {"total_memory": gpu_bytes}))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    args = Namespace(model=str(tmp_path), dtype="auto", revision=None)
    assert 1.5e9 < encode_checks._tower_bytes(str(tmp_path), "auto", None) < 1.9e9
    assert encode_checks._tp_for_memory(args, device, 16) == expected


def _can_create_in(folder: str) -> bool:
    try:
        with open(os.path.join(folder, ".tp-siglip-probe"), "w"):
            pass
    except OSError:
        return False
    os.unlink(os.path.join(folder, ".tp-siglip-probe"))
    return True


def test_bad_option_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        encode.main(["--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_safetensors_output_with_a_trailing_slash_is_refused(capsys):
    """``--output emb.safetensors/`` names a folder and a file at once; argparse's Path would drop the slash."""
    with pytest.raises(SystemExit) as exit_info:
        encode.main(["--output", "emb.safetensors/"])
    assert exit_info.value.code == 2
    assert "emb.safetensors/ ends in '/' like a folder" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["offline", "transformers-offline", "unreachable", "unreachable-offline-0"])
def test_model_that_cannot_be_fetched(setup, how, tmp_path, monkeypatch, capsys):
    """One line naming the repo and the fixes; "set HF_HUB_OFFLINE=1" only where offline mode is off (flags parsed as
    huggingface_hub parses them: HF_HUB_OFFLINE=0 is off, TRANSFORMERS_OFFLINE=1 is on)."""
    _, _, corpus, _ = setup
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if how == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif how == "transformers-offline":
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0") if how.endswith("-0") else monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    code, _, err = _run([corpus / GOOD[0], "--model", "test-org/not-cached", "--output", tmp_path / "o.safetensors"], capsys)
    assert code == 1, err
    errors = _error_lines(err)
    assert len(errors) == 1, err
    assert "test-org/not-cached" in errors[0] and "--model <local folder>" in errors[0], errors[0]
    assert ("offline" if how.endswith("offline") else "could not be reached") in errors[0]
    assert ("set HF_HUB_OFFLINE=1" in errors[0]) == how.startswith("unreachable"), errors[0]


def test_repo_refused_for_its_content_gets_no_network_hint(setup, tmp_path, monkeypatch, capsys):
    """A Hub repo that was reached but is refused (only pytorch_model.bin): the line names the pickle, and does
    not send the user to the network fixes (a local folder, HF_HUB_OFFLINE=1), which cannot help."""
    from hub_server import HubServer
    from test_hub import point_hf_at

    _, checkpoint, corpus, _ = setup
    repo = tmp_path / "pickle-only"
    repo.mkdir()
    (repo / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    (repo / "pytorch_model.bin").write_bytes(b"never opened")
    with HubServer() as server:
        server.add_repo("test-org/pickle-only", repo)
        point_hf_at(monkeypatch, server.endpoint, tmp_path / "cache")
        code, _, err = _run([corpus / GOOD[0], "--model", "test-org/pickle-only", "--output", tmp_path / "o.safetensors"], capsys)
    assert code == 1, err
    errors = _error_lines(err)
    assert len(errors) == 1 and "pytorch_model.bin" in errors[0] and "never unpickles" in errors[0], err
    assert "--model <local folder>" not in errors[0] and "HF_HUB_OFFLINE" not in errors[0], errors[0]


def test_resume_after_the_hub_repo_changed_names_the_commit(setup, tmp_path, monkeypatch, capsys):
    """The output records the Hub commit its weights came from: a --resume after the repo's main moved on is
    refused (exit 2) naming that commit and the fix, --revision <sha>, which then continues it (from the cache)."""
    import shutil

    from hub_server import HubServer
    from test_hub import point_hf_at

    _, checkpoint, corpus, _ = setup
    output = tmp_path / "emb"
    args = [corpus / GOOD[0], corpus / GOOD[1], "--model", "test-org/tower", "--output", output]
    changed = tmp_path / "changed"
    shutil.copytree(checkpoint, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "note": "a new commit, the same geometry"}))
    with HubServer() as server:
        first = server.add_repo("test-org/tower", checkpoint)
        point_hf_at(monkeypatch, server.endpoint, tmp_path / "cache")
        code, _, err = _run(args, capsys)
        assert code == 0 and json.loads((output / "manifest.json").read_text())["revision"] == first, err
        second = server.add_repo("test-org/tower", changed)
        code, _, err = _run([*args, "--resume"], capsys)
    assert second != first and code == 2, err
    (line,) = _error_lines(err)
    assert f"revision {first}, this run uses {second}: pass --revision {first}" in line, line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the first commit is no longer served, but it is in the cache
    code, out, err = _run([*args, "--resume", "--revision", first], capsys)
    assert code == 0 and "summary: 0 encoded" in out, err


# ----------------------------------------------------------------------------- a real-looking corpus


def test_bad_files_are_skipped_with_reasons(setup, tmp_path, capsys):
    _, checkpoint, corpus, reference = setup
    output = tmp_path / "out" / "emb.safetensors"
    output.parent.mkdir()
    code, out, err = _run([corpus, "--model", checkpoint, "--output", output, "--batch-size", "2", "--shard-size", "3"], capsys)
    assert code == 0, err
    tensors, meta = _read(output)
    good = [str(corpus / name) for name in GOOD]
    assert json.loads(meta["paths"]) == good  # every readable image, in listing order, across the shards
    assert (tensors["pooler_output"] - torch.stack([reference[p] for p in good])).abs().max() <= TOLERANCE
    skipped = json.loads(meta["skipped"])
    assert [path for path, _ in skipped] == [str(corpus / name) for name in LISTED if name in BAD]
    for path, reason in skipped:
        fragment = BAD[Path(path).relative_to(corpus).as_posix()]
        assert fragment in reason.lower(), (path, reason)
        assert f"skipped {path}: {reason}" in out.splitlines()
    summary = [line for line in out.splitlines() if line.startswith("summary:")]
    ignored = ", ".join(f"{k}: {v}" for k, v in sorted(IGNORED.items()))
    assert summary == [
        f"summary: {len(GOOD)} encoded, {len(BAD)} skipped (unreadable or missing), {sum(IGNORED.values())} ignored by "
        f"extension ({ignored}), {HIDDEN} hidden file(s) ignored"
    ], out
    assert meta["complete"] == "true" and json.loads(meta["manifest"])["shard_size"] == 3
    assert out.count("shards done here") == -(-len(LISTED) // 3)  # one commit per shard
    assert sorted(p.name for p in output.parent.iterdir()) == ["emb.safetensors"]  # no work folder or temporary left
    # --resume on the finished file (several shards, some skips): nothing to do, the file's skips in the summary
    code, out, err = _run([corpus, "--model", checkpoint, "--output", output, "--batch-size", "2", "--shard-size", "3",
                           "--resume"], capsys)  # fmt: skip
    assert code == 0 and f"summary: 0 encoded, {len(BAD)} skipped" in out and f"is complete ({len(GOOD)} rows)" in out, err


@pytest.mark.parametrize("name", ["none.safetensors", "none"])
def test_no_readable_image_is_exit_1_for_both_outputs(setup, tmp_path, capsys, name):
    _, checkpoint, corpus, _ = setup
    output = tmp_path / name
    folder = tmp_path / "bad"  # a folder of unreadable files only (a broken link among them)
    folder.mkdir()
    for bad in BAD:
        (folder / Path(bad).name).symlink_to(corpus / bad)
    if not output.suffix:  # a folder holding only hidden files is empty enough for an output
        output.mkdir()
        (output / ".DS_Store").write_bytes(b"x")
    code, out, err = _run([folder, "--model", checkpoint, "--output", output], capsys)
    assert code == 1 and f"skipped {folder / 'e_empty.jpg'}: empty file (0 bytes)" in out, (out, err)
    (line,) = _error_lines(err)
    assert "no readable image among the inputs" in line, line
    if output.suffix:
        assert not output.exists() and not _work_folder(output).exists()
    else:  # the folder keeps the shard's stats file, which lists why each image was skipped
        (stats,) = embeddings_dir.completed_shards(output).values()
        assert stats["rows"] == 0 and len(stats["skipped"]) == len(BAD)


def test_a_header_safetensors_cannot_read_is_refused(setup, clean_folder, tmp_path, capsys, monkeypatch, no_model_load):
    """Past safetensors' 100 MB header (about 2 million paths) safe_open refuses the file: plain files' paths are
    counted before the model loads (exit 2); keys known only later refuse the write, keeping the shards (exit 1)."""
    _, checkpoint, _, _ = setup
    output = tmp_path / "big.safetensors"
    monkeypatch.setattr(encode.encode_corpus, "SAFETENSORS_MAX_HEADER", 50)
    code, _, err = _run([clean_folder, "--model", checkpoint, "--output", output], capsys)
    (line,) = _error_lines(err)
    assert code == 2 and "over the 50 of a safetensors header" in line and f"--output {tmp_path / 'big'}/" in line, err
    monkeypatch.undo()  # the model loads again
    monkeypatch.setattr(embeddings_file, "SAFETENSORS_MAX_HEADER", 50)
    code, _, err = _run([clean_folder, "--model", checkpoint, "--output", output], capsys)
    (line,) = _error_lines(err)
    assert code == 1 and "over the 50 safetensors reads" in line and not output.exists(), err
    assert len(embeddings_dir.completed_shards(_work_folder(output))) == 1


def _work_folder(output: Path) -> Path:
    return output.parent / f".{output.name}.parts"


def test_strict_stops_at_the_first_bad_file(setup, tmp_path, capsys):
    _, checkpoint, corpus, _ = setup
    output = tmp_path / "strict.safetensors"
    args = [corpus, "--model", checkpoint, "--output", output, "--strict", "--batch-size", "1", "--shard-size", "1"]
    code, out, err = _run(args, capsys)
    assert code == 1
    first_bad = corpus / next(name for name in LISTED if name in BAD)
    errors = _error_lines(err)
    assert len(errors) == 1 and f"--strict: cannot use {first_bad}:" in errors[0], err
    assert not output.exists()  # the file is written only once every shard is complete
    complete = embeddings_dir.completed_shards(_work_folder(output))  # what was committed before it is kept
    assert [stats["keys"] for stats in complete.values()] == [[str(corpus / LISTED[0])]]


@pytest.fixture(scope="module")
def clean_folder(setup):
    root, _, corpus, _ = setup
    folder = root / "clean"
    folder.mkdir()
    for name in GOOD:
        (folder / Path(name).name).write_bytes((corpus / name).read_bytes())
    return folder


def test_interrupted_run_resumes(setup, clean_folder, tmp_path, capsys, monkeypatch):
    _, checkpoint, _, _ = setup
    args = [clean_folder, "--model", checkpoint, "--batch-size", "2", "--tokens", "--shard-size", "2"]
    code, _, err = _run([*args, "--output", tmp_path / "full.safetensors"], capsys)
    assert code == 0, err
    full, _ = _read(tmp_path / "full.safetensors")

    real_load = encode._load_model

    def load_then_interrupt(*a, **k):
        model = real_load(*a, **k)
        forward, calls = model.forward, []

        def interrupted_forward(*fa, **fk):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return forward(*fa, **fk)

        model.forward = interrupted_forward
        return model

    output = tmp_path / "resumed.safetensors"
    monkeypatch.setattr(encode, "_load_model", load_then_interrupt)
    code, out, err = _run([*args, "--output", output], capsys)
    assert code == encode.EXIT_INTERRUPTED and "--resume" in err, err
    assert not output.exists() and list(embeddings_dir.completed_shards(_work_folder(output))) == [0]
    code, _, err = _run([*args, "--output", output], capsys)  # the interrupted run is not silently dropped
    assert code == 2 and "interrupted run" in err and "--resume" in err, err
    monkeypatch.setattr(encode, "_load_model", real_load)

    code, out, err = _run([*args, "--output", output, "--resume"], capsys)
    assert code == 0, err
    resumed, meta = _read(output)
    assert meta["complete"] == "true" and "(1 already complete)" in out and "summary: 2 encoded" in out, out
    assert json.loads(meta["paths"]) == [str(p) for p in sorted(clean_folder.iterdir())]
    for name in ("pooler_output", "last_hidden_state"):
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6)
    assert not _work_folder(output).exists()

    code, out, err = _run([*args, "--output", output, "--resume"], capsys)  # nothing left to do
    assert code == 0 and "summary: 0 encoded" in out and "is complete (4 rows)" in out, err
    torch.testing.assert_close(_read(output)[0]["pooler_output"], full["pooler_output"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("change", ["model", "tokens", "dtype", "dtype-auto"])
def test_resume_refuses_another_setup(setup, clean_folder, tmp_path, capsys, change):
    root, checkpoint, _, _ = setup
    output = tmp_path / "earlier.safetensors"
    first = [clean_folder / "a_good.png", "--model", checkpoint, "--output", output]
    code, _, err = _run([*first, *(["--dtype", "bfloat16"] if change == "dtype-auto" else [])], capsys)
    assert code == 0, err
    before = output.read_bytes()
    other = {
        "model": ["--model", root / "corpus" / ".." / "checkpoint"],  # the same weights, another name: refused
        "tokens": ["--tokens"],
        "dtype": ["--dtype", "float16"],
        "dtype-auto": [],  # auto resolves to float32 after loading; the earlier output is bfloat16
    }[change]
    code, _, err = _run([*first, "--resume", *other], capsys)
    assert code == 2, err
    errors = _error_lines(err)
    assert len(errors) == 1 and "--resume" in errors[0], err
    assert output.read_bytes() == before


def test_failed_write_keeps_the_earlier_output(setup, clean_folder, tmp_path, capsys, monkeypatch):
    _, checkpoint, _, _ = setup
    output = tmp_path / "kept.safetensors"
    code, _, err = _run([clean_folder, "--model", checkpoint, "--output", output], capsys)
    assert code == 0, err
    before = output.read_bytes()
    real = embeddings_file.write_atomically

    def disk_full(path, fill):
        def half(target):
            target.write(b"\0" * 100)
            raise OSError(28, "No space left on device")

        real(path, half)

    monkeypatch.setattr(embeddings_file, "write_atomically", disk_full)
    code, _, err = _run([clean_folder, "--model", checkpoint, "--output", output, "--tokens"], capsys)
    assert code == 1 and "No space left on device" in err
    assert output.read_bytes() == before
    # the committed shards stay for --resume; no temporary file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == [".kept.safetensors.parts", "kept.safetensors"]
    monkeypatch.setattr(embeddings_file, "write_atomically", real)
    code, out, err = _run([clean_folder, "--model", checkpoint, "--output", output, "--tokens", "--resume"], capsys)
    assert code == 0 and "summary: 0 encoded" in out and "last_hidden_state" in _read(output)[0], err


# ----------------------------------------------------------------------------- the sink protocol


class _RecordingSink:
    """A `encode.Sink` that keeps what the batch loop hands it."""

    def __init__(self) -> None:
        self.items, self.rows, self.skipped = [], [], {}

    def add(self, items, tensors):
        self.items += [str(item) for item in items]
        self.rows.append(tensors["pooler_output"])

    def skip(self, item, reason):
        self.skipped[str(item)] = reason


def test_the_batch_loop_gives_a_sink_rows_and_reasons(setup, tmp_path):
    """What both outputs build on: readable items' rows in order, each unreadable item once with its reason."""
    from tp_siglip.console import Printer

    _, checkpoint, corpus, reference = setup
    args = encode.build_parser().parse_args([str(corpus), "--model", str(checkpoint), "--output", str(tmp_path / "x.safetensors"),
                                             "--batch-size", "3", "--workers", "0"])  # fmt: skip
    checked = encode.check_arguments(args, 0, 1)
    job = encode.Job(args, checked, encode._load_model(args, None, 1), encode.Dealing(0, 1, None, 1, None), Printer(0, 1))
    job.start()
    sink = _RecordingSink()
    encoded = job.encode([corpus / name for name in LISTED], sink)
    good = [str(corpus / name) for name in LISTED if name in GOOD]
    assert encoded == len(GOOD) and sink.items == good and job.times["decoded"] == len(LISTED)
    assert (torch.cat(sink.rows) - torch.stack([reference[p] for p in good])).abs().max() <= TOLERANCE
    assert sorted(sink.skipped) == sorted(str(corpus / name) for name in BAD)
    for name, fragment in BAD.items():
        assert fragment in sink.skipped[str(corpus / name)].lower() or fragment in sink.skipped[str(corpus / name)], name


# ----------------------------------------------------------------------------- two ranks


def _rank_task(rank: int, world_size: int, argv: list[str], unreadable_on_rank_1: list[str], extra_on_rank_1: str) -> tuple:
    from tp_siglip import processing

    if rank == 1 and unreadable_on_rank_1:
        real = processing.load_image

        def flaky(path):
            if str(path) in unreadable_on_rank_1:  # as load_image reports a read error
                raise ValueError(f"Cannot read image file '{path}'") from OSError("stale file handle")
            return real(path)

        processing.load_image = flaky
    if rank == 1 and extra_on_rank_1:
        argv = [extra_on_rank_1, *argv]
    result = encode_main_captured(argv)
    if rank == 1 and unreadable_on_rank_1:
        processing.load_image = real
    return result


def test_two_ranks_stay_in_lockstep(setup, tmp_path):
    """Each image is decoded by one rank only, and that rank decides: batches of 3 over 2 ranks are split 2/1,
    so rank 1 decodes c_good.jpg (and cannot read it: skipped, with rank 1's reason, printed by rank 0), while
    rank 1's failure to read a_good.png does not matter (rank 0 decodes it)."""
    _, checkpoint, corpus, reference = setup
    flaky, not_mine = str(corpus / GOOD[1]), str(corpus / GOOD[0])
    assert [LISTED[0], LISTED[2]] == [GOOD[0], GOOD[1]]
    output = tmp_path / "ranks.safetensors"
    argv = [str(corpus), "--model", str(checkpoint), "--output", str(output), "--batch-size", "3"]
    pool = RankPool(2, tmp_path)
    try:
        (code0, out0, err0), (code1, out1, err1) = pool.run(_rank_task, argv, [flaky, not_mine], "", timeout=180)
        assert code0 == 0 and code1 == 0, (err0, err1)
        assert f"skipped {flaky}: OSError: stale file handle" in out0.splitlines(), out0
        assert out1 == "" and err1 == "", (out1, err1)
        for name in BAD:
            assert f"skipped {corpus / name}: " in out0
        batches = [min(3, len(LISTED) - start) for start in range(0, len(LISTED), 3)]
        assert f"images decoded per rank: {sum(-(-n // 2) for n in batches)}/{sum(n // 2 for n in batches)}" in out0, out0
        tensors, meta = _read(output)
        good = [str(corpus / name) for name in GOOD if str(corpus / name) != flaky]
        assert json.loads(meta["paths"]) == good and meta["world_size"] == "2"
        assert (tensors["pooler_output"] - torch.stack([reference[p] for p in good])).abs().max() <= TOLERANCE

        mismatch = [*argv[:-2], "--output", str(tmp_path / "never.safetensors")]
        results = pool.run(_rank_task, mismatch, [], str(checkpoint / "config.json"), timeout=180)
        for code, _, err in results:
            assert code == 1 and "the ranks list different image files" in err, err
        assert not (tmp_path / "never.safetensors").exists()
    finally:
        pool.close()


def _worker_dies_on_rank_3(rank: int, world_size: int, argv: list[str]) -> tuple:
    from tp_siglip import pipeline

    real = pipeline.decoded_portions
    if rank == 3:

        def failing(decoder, workers, **kwargs):
            for index, portion in enumerate(real(decoder, workers, **kwargs)):
                if index == 1:
                    raise pipeline.DecodeWorkerDied("a decode worker died (test)")
                yield portion

        pipeline.decoded_portions = failing
    try:
        return encode_main_captured(argv)
    finally:
        pipeline.decoded_portions = real


def test_a_failure_in_one_tensor_group_stops_every_group(setup, tmp_path):
    """4 ranks, --tp 2, one file: rank 3's decode worker dies in the second batch. Its tensor group skips the
    forward and carries the failure to the gather of the batch's rows, so the other group is not left waiting:
    every rank exits 1, and no file is written (its one shard never completed)."""
    _, checkpoint, corpus, _ = setup
    output = tmp_path / "stopped.safetensors"
    argv = [str(corpus), "--model", str(checkpoint), "--output", str(output), "--batch-size", "4", "--tp", "2"]
    pool = RankPool(4, tmp_path)
    try:
        results = pool.run(_worker_dies_on_rank_3, argv, timeout=180)
    finally:
        pool.close()
    assert [code for code, _, _ in results] == [encode.EXIT_FAILED] * 4, results
    assert "rank 3: a decode worker died (test)" in results[0][2], results[0][2]
    assert not output.exists()


def _commit_fails_on_rank_0(rank: int, world_size: int, argv: list[str]) -> tuple:
    from tp_siglip import embeddings_dir

    real = embeddings_dir.ShardWriter.commit
    if rank == 0:

        def second_commit_fails(self, *args, **kwargs):
            if self.index == 1:
                self.abort()
                raise OSError(28, "No space left on device")
            return real(self, *args, **kwargs)

        embeddings_dir.ShardWriter.commit = second_commit_fails
    try:
        return encode_main_captured(argv)
    finally:
        embeddings_dir.ShardWriter.commit = real


def test_a_failed_commit_stops_every_rank_at_once(setup, tmp_path):
    """2 ranks, one file in shards of 2 images: rank 0 (the writer) cannot commit the second shard. Every rank
    learns of it at the end of that shard and exits 1 (none waits in the next shard's first batch); the first
    shard stays committed for --resume."""
    _, checkpoint, corpus, _ = setup
    output = tmp_path / "full.safetensors"
    argv = [str(corpus), "--model", str(checkpoint), "--output", str(output), "--batch-size", "2", "--shard-size", "2"]
    pool = RankPool(2, tmp_path)
    try:
        results = pool.run(_commit_fails_on_rank_0, argv, timeout=90)  # far below the process groups' timeout
    finally:
        pool.close()
    assert [code for code, _, _ in results] == [encode.EXIT_FAILED] * 2, results
    for _, _, err in results:
        assert "cannot commit shard 1 'files-00001'" in err and "No space left on device" in err, err
    assert not output.exists() and list(embeddings_dir.completed_shards(_work_folder(output))) == [0]

