"""A regular (non-editable) ``pip install`` of the checkout works on its own: the package has every module
it needs, and a model builds and runs from the installed copy.

The fresh virtual environment gets no pip and no packages of its own. A ``.pth`` file in its
site-packages lists the site-packages of the Python running the tests, so torch, numpy, pip and
setuptools are reused and nothing is downloaded (``--no-index`` makes sure of it). This also works when
the tests themselves run inside a virtual environment, where ``--system-site-packages`` would expose the
base interpreter's packages instead. A ``.pth`` file's lines are only added to ``sys.path``; the ``.pth``
files inside those folders are not run. So an editable install of tp-siglip there (a ``.pth`` pointing at
the checkout's ``src``) cannot shadow the installed copy, and the test checks that it does not.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300

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
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture
def clean_checkout():
    """Remove the build/ and src/*.egg-info that an in-tree build leaves, unless they were there before."""
    artifacts = lambda: {REPO / "build", *REPO.glob("src/*.egg-info")}  # noqa: E731
    before = {p for p in artifacts() if p.exists()}
    yield
    for path in artifacts() - before:
        shutil.rmtree(path, ignore_errors=True)


def test_pip_install_into_fresh_venv(tmp_path, clean_checkout):
    for needed in ("pip", "setuptools"):  # found, not imported: setuptools must not patch this process
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"{needed} is not installed")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=dict(os.environ))
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_INDEX_URL")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    where = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
    purelib = Path(where.stdout.strip())
    (purelib / "_outer_packages.pth").write_text("\n".join(_outer_site_dirs()) + "\n")

    _run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", str(REPO)],
        cwd=tmp_path,
        env=env,
    )

    work = tmp_path / "elsewhere"  # outside the checkout, so neither '' nor the cwd can find src/
    work.mkdir()
    proc = _run([str(python), "-c", SMOKE], cwd=work, env=env)
    imported_from = Path(proc.stdout.splitlines()[0]).resolve()
    assert imported_from.is_relative_to(purelib.resolve()), imported_from
    assert not imported_from.is_relative_to(REPO), imported_from
    assert proc.stdout.splitlines()[-1] == "OK"
