"""The package as it would be published: an sdist built from the checkout, a wheel built from that sdist,
and a regular (non-editable) ``pip install`` of the wheel that works on its own: every module is there, a
model builds and runs from the installed copy, and the installed ``tp-siglip encode`` command encodes the
bundled photos (package data) with a checkpoint the test builds, matching transformers.

Nothing is downloaded. The builds call setuptools' own PEP 517 hooks (what ``pip wheel
--no-build-isolation`` and ``python -m build --no-isolation`` call) on a copy of the checkout, so the
checkout gets no ``build/`` or ``*.egg-info``. The fresh virtual environment gets no pip and no packages of
its own. A ``.pth`` file in its site-packages lists the site-packages of the Python running the tests, so
torch, numpy, pip and setuptools are reused (``--no-index`` makes sure of it). This also works when the
tests themselves run inside a virtual environment, where ``--system-site-packages`` would expose the base
interpreter's packages instead. A ``.pth`` file's lines are only added to ``sys.path``; the ``.pth`` files
inside those folders are not run. So an editable install of tp-siglip there (a ``.pth`` pointing at the
checkout's ``src``) cannot shadow the installed copy, and the test checks that it does not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
IMAGES = ["astronaut.jpg", "camera.png", "chelsea.png", "coffee.jpg", "rocket.jpg"]
NOT_COPIED = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis", ".venv*",
    "*.safetensors", "notes",
)
BUILD = "import sys, setuptools.build_meta as hooks; print(getattr(hooks, sys.argv[1])(sys.argv[2]))"

SMOKE = """
import importlib, pkgutil, sys
import torch
import tp_siglip
from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer

print(tp_siglip.__file__)
for module in pkgutil.walk_packages(tp_siglip.__path__, "tp_siglip."):
    importlib.import_module(module.name)
config = SiglipVisionConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            image_size=32, patch_size=8)
model = SiglipVisionTransformer(config).eval()
with torch.inference_mode():
    out = model(torch.randn(2, 3, 32, 32))
assert out.last_hidden_state.shape == (2, 16, 64), out.last_hidden_state.shape
assert out.pooler_output.shape == (2, 64), out.pooler_output.shape
assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
print("OK")
"""


def _outer_site_dirs() -> list[str]:
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if Path(d).is_dir()]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_INDEX_URL")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # the installed command must not need the network
    return env


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel): the sdist from a copy of the checkout, the wheel from the unpacked sdist."""
    if importlib.util.find_spec("setuptools") is None:  # found, not imported: it must not patch this process
        pytest.skip("setuptools is not installed")
    root = tmp_path_factory.mktemp("dists")
    source, out = root / "checkout", root / "dist"
    shutil.copytree(REPO, source, ignore=NOT_COPIED)
    env = _clean_env()
    name = _run([sys.executable, "-c", BUILD, "build_sdist", out], cwd=source, env=env).stdout.strip().splitlines()[-1]
    sdist = out / name
    with tarfile.open(sdist) as archive:
        archive.extractall(root / "unpacked", filter="data")
    (unpacked,) = (root / "unpacked").iterdir()
    name = _run([sys.executable, "-c", BUILD, "build_wheel", out], cwd=unpacked, env=env).stdout.strip().splitlines()[-1]
    return sdist, out / name


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(python, purelib, env) of a fresh virtual environment with the wheel installed."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed")
    root = tmp_path_factory.mktemp("venv")
    env = _clean_env()
    _run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], cwd=root, env=env)
    python = root / "venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    where = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env)
    purelib = Path(where.stdout.strip())
    (purelib / "_outer_packages.pth").write_text("\n".join(_outer_site_dirs()) + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", dists[1]], cwd=root, env=env)
    return python, purelib, env


def test_build_requires_a_setuptools_that_reads_the_license_expression():
    """``project.license = "Apache-2.0"`` (a PEP 639 SPDX string) and ``license-files`` are read by setuptools 77.0.3
    and later only; an older one (allowed by a lower ``build-system.requires`` bound, and used by ``pip install
    --no-build-isolation``) refuses pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.version import Version

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert isinstance(pyproject["project"]["license"], str) and pyproject["project"]["license-files"]
    (setuptools,) = [Requirement(r) for r in pyproject["build-system"]["requires"] if Requirement(r).name == "setuptools"]
    lowest = [Version(s.version) for s in setuptools.specifier if s.operator in (">=", "==", "~=")]
    assert lowest and min(lowest) >= Version("77.0.3"), setuptools


def test_sdist_holds_docs_examples_tests_and_package_data(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = {"README.md", "LICENSE", "pyproject.toml", "MANIFEST.in", "examples/encode.py", "tests/test_encode.py",
                "tests/checkpoints.py", "tests/corpus.py", "benchmarks/encode_memory.py", "src/tp_siglip/py.typed",
                "src/tp_siglip/images/SOURCES.md", *(f"src/tp_siglip/images/{n}" for n in IMAGES)}
    assert expected <= names, sorted(expected - names)
    checkout = {p.relative_to(REPO).as_posix() for p in (REPO / "src" / "tp_siglip").glob("*.py")}
    assert checkout <= names, sorted(checkout - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_holds_modules_types_images_and_the_command(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = archive.read(info).decode()
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    modules = {f"tp_siglip/{p.name}" for p in (REPO / "src" / "tp_siglip").glob("*.py")}
    data = {"tp_siglip/py.typed", "tp_siglip/images/SOURCES.md", *(f"tp_siglip/images/{n}" for n in IMAGES)}
    assert modules | data <= names, sorted((modules | data) - names)
    assert "tp-siglip = tp_siglip.cli:main" in entry_points
    assert "Classifier: Typing :: Typed" in meta and "Project-URL: Source," in meta
    assert "Requires-Dist: torch" in meta and "Provides-Extra: images" in meta


def test_pip_install_into_fresh_venv(venv, tmp_path):
    python, purelib, env = venv
    work = tmp_path / "elsewhere"  # outside the checkout, so neither '' nor the cwd can find src/
    work.mkdir()
    proc = _run([python, "-c", SMOKE], cwd=work, env=env)
    imported_from = Path(proc.stdout.splitlines()[0]).resolve()
    assert imported_from.is_relative_to(purelib.resolve()), imported_from
    assert not imported_from.is_relative_to(REPO), imported_from
    assert proc.stdout.splitlines()[-1] == "OK"


def test_installed_command_encodes_the_bundled_photos(venv, tmp_path):
    from safetensors import safe_open
    from transformers.utils import logging as hf_logging

    from tp_siglip import __version__

    from checkpoints import TINY, save_layout, vision_model
    from references import siglip_image_processor

    python, purelib, env = venv
    model = vision_model({**TINY, "image_size": 32, "patch_size": 8}, seed=3)
    checkpoint = save_layout(model, "v5_vision", tmp_path / "checkpoint")
    work = tmp_path / "elsewhere"
    work.mkdir()
    command = python.parent / ("tp-siglip.exe" if os.name == "nt" else "tp-siglip")
    proc = _run([command, "encode", "--model", checkpoint, "--output", "emb.safetensors"], cwd=work, env=env)
    images = purelib / "tp_siglip" / "images"
    assert "summary: 5 encoded, 0 skipped (unreadable or missing)" in proc.stdout, proc.stdout
    with safe_open(str(work / "emb.safetensors"), framework="pt") as f:
        meta, pooled = f.metadata(), f.get_tensor("pooler_output")
    paths = json.loads(meta["paths"])
    assert [Path(p).resolve() for p in paths] == [(images / n).resolve() for n in IMAGES]
    assert meta["complete"] == "true" and meta["model"] == str(checkpoint)

    hf_logging.set_verbosity_error()
    processor = siglip_image_processor(size={"height": 32, "width": 32})
    with torch.no_grad():
        expected = model(pixel_values=processor(images=paths, return_tensors="pt")["pixel_values"]).pooler_output
    assert (pooled - torch.nn.functional.normalize(expected, dim=-1)).abs().max().item() <= 2e-3  # stored normalised

    report = _run([command, "env"], cwd=work, env=env).stdout
    assert f"- tp-siglip: {__version__} ({(purelib / 'tp_siglip').resolve()})" in report  # built from this checkout
    assert _run([python, "-m", "tp_siglip", "--version"], cwd=work, env=env).stdout.strip() == f"tp-siglip {__version__}"
