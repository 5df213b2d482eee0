"""README.md and docs/*.md tell the truth about the files and commands they show.

* Every relative link points at a file that exists, and every ``#anchor`` at a heading of its target
  (GitHub's rule for heading anchors: lower case, punctuation dropped, spaces to hyphens, ``-1``, ``-2``
  for repeated headings). Links inside code are not links.
* Every ``tests/FILE.py::FUNCTION`` a page names (docs/reliability.md cites them as proof) is a test
  function that exists.
* The README stays short (at most 200 lines) and keeps the quick-start commands exactly.
* **Shell blocks run.** Convention: an HTML comment on the line before a fenced ``bash`` block marks it,
  ``<!-- docs-test: run -->`` (this test runs it) or ``<!-- docs-test: skip (why) -->``; every ``bash``
  block that shows the encode job (``tp-siglip encode``, ``tp_siglip.encode``) must carry one of the two.
  A marked block runs line by line, in order, in a fresh folder holding ``photos/`` (the bundled
  photos), each line with its documented flags except one: the value of ``--model`` becomes a local tiny
  random checkpoint (the pages name Hub models, and tests have no network). ``tp-siglip`` runs as
  ``python -m tp_siglip``, ``torchrun`` as ``python -m torch.distributed.run --standalone``, a trailing
  ``# comment`` is dropped and leading ``VAR=value`` words go to the environment. Each line must exit 0 and
  leave a complete output file holding every photo, written by as many ranks as it launched (or a
  complete corpus folder, read back with ``open_embeddings``, holding every photo).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import safe_open

from tp_siglip import open_embeddings

from checkpoints import TINY, save_layout, vision_model

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PHOTOS = REPO / "src" / "tp_siglip" / "images"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}
CONFIG = {**TINY, "image_size": 64, "patch_size": 16}
MARK = re.compile(r"^<!--\s*docs-test:\s*(run|skip)\b(.*?)-->\s*$")
FENCE = re.compile(r"^(```+|~~~+)\s*(\S*)")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
TEST_REFERENCE = re.compile(r"\b(test_\w+\.py)::(test_\w+)")
ENCODE_JOB = re.compile(r"tp-siglip encode|tp_siglip\.encode|-m tp_siglip encode")
QUICK_START = [
    'pip install torch==2.13.0 && pip install ".[images]"',
    "torchrun --nproc-per-node 2 -m tp_siglip.encode",
    'pip install torch==2.13.0 && pip install -e ".[test]" torch==2.13.0',
    "pip install --no-deps --force-reinstall torchvision==0.16.2",
    "python -m pytest -q",
]
README_MAX_LINES = 200
TIMEOUT_S = 120


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    mark: str  # "run", "skip" or ""
    text: str


def _blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the docs-test mark on the line before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, start = opening.group(1), index
        index += 1
        while index < len(lines) and not lines[index].startswith(fence):
            index += 1
        previous = MARK.match(lines[start - 1].strip()) if start > 0 else None
        blocks.append(Block(page, start + 1, opening.group(2), previous.group(1) if previous else "", "\n".join(lines[start + 1 : index])))
        index += 1
    return blocks


def _prose(page: Path) -> str:
    """The page without its fenced blocks and inline code (where a ``[x](y)`` is not a link)."""
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^(```+|~~~+).*?^\1[ \t]*$", "", text, flags=re.S | re.M)
    return re.sub(r"(`+).*?\1", "", text, flags=re.S)


def _slug(heading: str) -> str:
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = _slug(heading.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_slug_follows_githubs_rule():
    assert _slug("Ours vs transformers: throughput") == "ours-vs-transformers-throughput"
    assert _slug("`from_pretrained` arguments") == "from_pretrained-arguments"
    assert _slug("Fused q/k/v: one GEMM instead of three") == "fused-qkv-one-gemm-instead-of-three"
    assert _slug("The encode job: `tp-siglip encode`") == "the-encode-job-tp-siglip-encode"


def test_the_pages_exist():
    names = {page.name for page in PAGES}
    for name in ("README.md", "vlm-server.md", "encode.md", "hub.md", "reliability.md", "architecture.md", "benchmarks.md"):
        assert name in names, name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files_and_headings_that_exist(page: Path):
    problems = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        if path_part.startswith("/"):
            problems.append(f"{target}: an absolute path does not resolve on GitHub")
            continue
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            problems.append(f"{target}: {resolved} does not exist")
        elif anchor and (resolved.suffix != ".md" or anchor not in _anchors(resolved)):
            problems.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not problems, f"{page.relative_to(REPO)}:\n" + "\n".join(problems)


def test_the_link_check_sees_broken_links(tmp_path: Path):
    """The checks above can fail: a missing file and a missing heading are both found."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nope) [gone](missing.md) `[code](x.md)`\n", encoding="utf-8")
    targets = LINK.findall(_prose(page))
    assert targets == ["#title", "#nope", "missing.md"]
    assert _anchors(page) == {"title"}


def test_named_tests_exist():
    cited = 0
    for page in PAGES:
        for file_name, function in TEST_REFERENCE.findall(page.read_text(encoding="utf-8")):
            source = REPO / "tests" / file_name
            assert source.exists(), f"{page.name} names {file_name}, which does not exist"
            assert re.search(rf"^def {function}\(", source.read_text(encoding="utf-8"), re.M), \
                f"{page.name} names {file_name}::{function}, which does not exist"
            cited += 1
    assert cited >= 30  # docs/reliability.md proves each guarantee with a test


def test_readme_is_short_and_keeps_the_quick_start():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    quick_start = next(b for b in _blocks(REPO / "README.md") if "pytest" in b.text)
    lines = [line for line in quick_start.text.splitlines() if line and not line.startswith("#")]
    assert lines == QUICK_START
    assert "Apache-2.0" in text and "(LICENSE)" in text


def test_every_encode_block_is_marked():
    unmarked = [f"{b.page.relative_to(REPO)}:{b.line}" for p in PAGES for b in _blocks(p)
                if b.language in ("bash", "sh", "shell", "console") and not b.mark
                and any(ENCODE_JOB.search(line.split("#")[0]) for line in b.text.splitlines())]
    assert not unmarked, f"bash blocks showing the encode job without a <!-- docs-test: run|skip (why) --> mark: {unmarked}"


RUN_BLOCKS = [b for p in PAGES for b in _blocks(p) if b.mark == "run"]


def test_the_run_blocks_are_found():
    assert {b.page.name for b in RUN_BLOCKS} >= {"README.md", "encode.md"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_layout(vision_model(CONFIG), "v5_vision", tmp_path_factory.mktemp("docs") / "tiny")


def _command(line: str, checkpoint: Path) -> tuple[list[str], dict[str, str]]:
    """The argv and extra environment of one documented line (see the module docstring)."""
    words = shlex.split(line, comments=True)
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if "--model" in words:
        words[words.index("--model") + 1] = str(checkpoint)
    program, rest = words[0], words[1:]
    if program == "tp-siglip":
        return [sys.executable, "-m", "tp_siglip", *rest], env
    if program == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", *rest], env
    if program == "python":
        return [sys.executable, *rest], env
    raise AssertionError(f"no rule to run {program!r}: {line}")


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: f"{b.page.relative_to(REPO)}:{b.line}")
def test_shell_blocks_run(block: Block, tiny_checkpoint: Path, tmp_path: Path):
    shutil.copytree(PHOTOS, tmp_path / "photos")
    photos = sorted(p.name for p in PHOTOS.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    lines = [line for line in block.text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines
    for line in lines:
        argv, extra = _command(line, tiny_checkpoint)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TP_SIGLIP_PG_TIMEOUT_S": "60", "HF_HUB_OFFLINE": "1", **extra}
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert done.returncode == 0, f"{line}\nexit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        words = shlex.split(line, comments=True)
        output = tmp_path / (words[words.index("--output") + 1] if "--output" in words else "embeddings.safetensors")
        ranks = words[words.index("--nproc-per-node") + 1] if "--nproc-per-node" in words else "1"
        if output.is_dir():  # a corpus run's folder of shards
            embeddings = open_embeddings(output)
            assert len(embeddings) == len(photos) and not embeddings.missing, line
            assert sorted(Path(key).name for key in embeddings.keys()) == photos, line  # noqa: SIM118 (keys() is a method of ours)
            continue
        with safe_open(str(output), framework="pt") as f:
            meta = f.metadata()
            assert f.get_tensor(meta["embedding"]).shape[0] == len(photos), line
        assert meta["complete"] == "true" and meta["world_size"] == ranks, (line, meta)
        assert sorted(Path(p).name for p in json.loads(meta["paths"])) == photos, line
        if "--tokens" in words:
            with safe_open(str(output), framework="pt") as f:
                assert "last_hidden_state" in f.keys(), line  # noqa: SIM118 (safe_open is not iterable)
        if "--resume" in words:
            assert "summary: 0 encoded" in done.stdout and "is complete" in done.stdout, done.stdout
