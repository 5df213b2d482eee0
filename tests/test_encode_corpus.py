"""``tp-siglip encode --output DIR``: img2dataset shards in, a folder of shards out, groups of ranks, resume by shard.

Runs the job as users run it (``torchrun -m tp_siglip.encode``, 2 CPU ranks) on webdataset tars and a parquet
shard made by ``shards.py``, and checks the rows against transformers' processor + model on the same image
bytes, the metadata against what the shards hold, and that a run killed with SIGKILL leaves nothing that
looks complete and resumes to the rows of a clean run.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tp_siglip
from tp_siglip import embeddings_dir, open_embeddings

from checkpoints import TINY, save_layout, vision_model
from shards import make_parquet, make_tar

REPO = Path(__file__).resolve().parents[1]
CONFIG = {**TINY, "image_size": 32, "patch_size": 16}
TOLERANCE = 2e-3


def _run(args: list[str], ranks: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TP_SIGLIP_PG_TIMEOUT_S": "60"}
    return subprocess.run([*launcher, "-m", "tp_siglip.encode", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three tars (one with a key without image, one with a truncated JPEG), one parquet shard, a checkpoint,
    and transformers' pooler_output for every image, by key."""
    from transformers.utils import logging as hf_logging

    from references import siglip_image_processor

    root = tmp_path_factory.mktemp("corpus-job")
    model = vision_model(CONFIG, seed=5)
    checkpoint = save_layout(model, "v5_vision", root / "checkpoint")
    (root / "shards").mkdir()
    images = {}
    images.update(make_tar(root / "shards" / "00000.tar", 0, 7, missing_image=3))
    images.update(make_tar(root / "shards" / "00001.tar", 1, 6, corrupt=1))
    images.update(make_tar(root / "shards" / "00002.tar", 2, 5))
    images.update(make_parquet(root / "shards" / "00003.parquet", 3, 6))
    broken = {"000010001"}
    good = {k: v for k, v in images.items() if k not in broken}
    hf_logging.set_verbosity_error()
    processor = siglip_image_processor(size={"height": 32, "width": 32})
    pils = [Image.open(io.BytesIO(good[k])).convert("RGB") for k in sorted(good)]
    with torch.no_grad():
        out = model(pixel_values=processor(images=pils, return_tensors="pt")["pixel_values"])
    reference = dict(zip(sorted(good), torch.nn.functional.normalize(out.pooler_output, dim=-1)))  # stored normalised
    inputs = [str(root / "shards" / "{00000..00002}.tar"), str(root / "shards" / "00003.parquet")]
    return root, checkpoint, inputs, reference


def _rows(folder: Path) -> dict[tuple[str, str], np.ndarray]:
    """``(shard, key) -> embedding`` through the package's reader."""
    opened = open_embeddings(folder)
    table = opened.metadata(columns=["shard", "key"]).to_pydict()
    matrix = opened[0 : len(opened)]
    return {(s, k): matrix[i] for i, (s, k) in enumerate(zip(table["shard"], table["key"]))}


@pytest.fixture(scope="module")
def two_groups(setup):
    root, checkpoint, inputs, _ = setup
    output = root / "two-groups"
    stdout = _ok(_run([*inputs, "--model", str(checkpoint), "--output", str(output), "--batch-size", "3"]))  # default --tp 1
    return output, stdout


def test_two_groups_match_transformers_with_metadata_and_reasons(setup, two_groups):
    _, _, _, reference = setup
    output, stdout = two_groups
    rows = _rows(output)
    assert sorted(k for _, k in rows) == sorted(reference)  # every readable image once; the broken two skipped
    for (_, key), vector in rows.items():
        assert np.abs(vector - reference[key].numpy()).max() <= TOLERANCE, key
    opened = open_embeddings(output)
    captions = opened.metadata(columns=["key", "caption"]).to_pydict()
    assert all(c == f"caption {k}" for k, c in zip(captions["key"], captions["caption"]))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["embedding"] == "pooler_output" and manifest["dtype"] == "float32" and len(manifest["shards"]) == 4
    assert sorted(embeddings_dir.completed_shards(output)) == [0, 1, 2, 3]
    assert "[group 0] shard" in stdout and "[group 1] shard" in stdout, stdout  # both groups worked
    assert "images/s" in stdout and "summary:" in stdout
    skipped = {key: why for stats in embeddings_dir.completed_shards(output).values() for key, why in stats["skipped"]}
    assert set(skipped) == {"000000003", "000010001"}, skipped
    assert "no image" in skipped["000000003"].lower() and "truncated" in skipped["000010001"].lower()


def test_one_tensor_parallel_group_writes_the_same_rows(setup, two_groups):
    root, checkpoint, inputs, _ = setup
    output = root / "one-group"
    _ok(_run([*inputs, "--model", str(checkpoint), "--output", str(output), "--batch-size", "4", "--tp", "2"]))
    ours, theirs = _rows(output), _rows(two_groups[0])
    assert sorted(ours) == sorted(theirs)
    for key, vector in ours.items():
        assert np.abs(vector - theirs[key]).max() <= 1e-5


def test_plain_files_are_dealt_to_every_group(setup, tmp_path):
    _, checkpoint, _, _ = setup
    photos = Path(tp_siglip.__file__).parent / "images"  # 5 photos: far fewer than --shard-size
    stdout = _ok(_run([str(photos), "--model", str(checkpoint), "--output", str(tmp_path / "emb")]))
    assert "[group 0] shard 0 'files-00000'" in stdout and "[group 1] shard 1 'files-00001'" in stdout, stdout
    assert [stats["rows"] for stats in embeddings_dir.completed_shards(tmp_path / "emb").values()] == [2, 3]


def test_resume_skips_complete_shards_and_refuses_another_setup(setup, two_groups):
    _, checkpoint, inputs, _ = setup
    output, _ = two_groups
    base = [*inputs, "--model", str(checkpoint), "--output", str(output), "--tp", "1"]
    again = _run(base, ranks=1)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume" in again.stderr, again.stderr
    stdout = _ok(_run([*base, "--resume"], ranks=1))
    assert "4 shard(s) (4 already complete)" in stdout and "0 images in" in stdout, stdout
    other = _run([*base, "--resume", "--dtype", "bfloat16"], ranks=1)
    assert other.returncode == 2 and "--resume" in other.stderr and "bfloat16" in other.stderr, other.stderr


def _rank_pids(parent: int) -> dict[int, int]:
    """``RANK -> pid`` of the workers torchrun started (children of ``parent`` whose environment has RANK)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [v for v in environ if v.startswith(b"RANK=")]
        if ppid == parent and rank:
            found[int(rank[0][5:])] = int(entry.name)
    return found


#: on rank 1 only (a ``sitecustomize`` on the ranks' path): its second shard commit blocks until the rank is killed
STALL_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import threading
    from tp_siglip import embeddings_dir
    commit, calls = embeddings_dir.ShardWriter.commit, []
    def stalled(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            threading.Event().wait()
        return commit(self, *args, **kwargs)
    embeddings_dir.ShardWriter.commit = stalled
"""


def test_a_rank_killed_mid_run_leaves_nothing_that_looks_complete_and_resume_finishes_it(setup, two_groups, tmp_path):
    """2 groups over 8 tar shards (group 0: shards 0, 2, 4, 6; group 1: 1, 3, 5, 7). Rank 1 stalls in the commit
    of its second shard (a deterministic point, not a time); once group 0 is done, rank 1 gets SIGKILL."""
    root, checkpoint, inputs, _ = setup
    many = tmp_path / "many"
    many.mkdir()
    for shard in range(8):
        make_tar(many / f"{shard:05d}.tar", shard, 12)
    output = tmp_path / "killed"
    args = [str(many / "{00000..00007}.tar"), "--model", str(checkpoint), "--output", str(output), "--tp", "1", "--batch-size", "1", "--workers", "0"]
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(STALL_RANK_1)
    path = os.pathsep.join([str(tmp_path / "hook"), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TP_SIGLIP_PG_TIMEOUT_S": "60", "PYTHONPATH": path}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "tp_siglip.encode"]
    proc = subprocess.Popen([*launcher, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (output.exists() and len(embeddings_dir.completed_shards(output)) == 5):
        time.sleep(0.02)  # polls a condition: group 0's four shards and rank 1's first
    pids = _rank_pids(proc.pid)
    assert 1 in pids, "rank 1 not found"
    os.kill(pids[1], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    complete = embeddings_dir.completed_shards(output)
    assert sorted(complete) == [0, 1, 2, 4, 6], complete  # shard 3's commit never began: its rows are only in a spool
    for index, stats in complete.items():  # what looks complete is complete
        assert np.load(output / "img_emb" / f"img_emb_{index:05d}.npy", mmap_mode="r").shape[0] == stats["rows"] == 12
    assert [p.name for p in output.iterdir() if p.name.startswith(".spool-")], "rank 1's spool of shard 3 is left"

    _ok(_run([*args, "--resume"]))
    clean = tmp_path / "clean"
    _ok(_run([*args[:4], str(clean), *args[5:]]))
    resumed, fresh = _rows(output), _rows(clean)
    assert sorted(resumed) == sorted(fresh) and len(fresh) == 96
    for key, vector in resumed.items():
        assert np.array_equal(vector, fresh[key]), key


def test_resume_names_what_differs_from_the_output_and_the_fix():
    from tp_siglip.encode_corpus import _other_run
    from tp_siglip.sources import ShardSpec

    def manifest(shards=3, **changes):
        specs = [ShardSpec(i, f"{i:05d}", "tar", f"/data/{i:05d}.tar") for i in range(shards)]
        setup = {"model": "m", "dtype": "float32", "embedding": "pooler_output", "hidden_size": 4,
                 "config": {"hidden_size": 4, "patch_size": 16}, "tokens": False, "normalized": True,
                 "output_dtype": "float32", "max_num_patches": None, "shard_size": 100, "revision": "a" * 40}  # fmt: skip
        return embeddings_dir.make_manifest(specs, **{**setup, **changes})

    earlier = manifest()
    assert _other_run(earlier, manifest()) is None
    cases = [
        (manifest(model="other"), "model m, this run uses other: pass --model m or use another --output"),
        (manifest(dtype="bfloat16"), "dtype float32, this run uses bfloat16: pass --dtype float32"),
        (manifest(tokens=True), "pass no --tokens"),
        (manifest(normalized=False), "pass no --no-normalize"),
        (manifest(output_dtype="float16"), "pass --output-dtype float32"),
        (manifest(shard_size=7), "pass --shard-size 100"),
        (manifest(revision="b" * 40), f"revision {'a' * 40}, this run uses {'b' * 40}: pass --revision {'a' * 40}"),
        (manifest(config={"hidden_size": 4, "patch_size": 14}), "config patch_size 16, this run uses patch_size 14: pass the --model"),
        (manifest(4), "3 shard(s) there, 4 now; shard 3 is none there, 00003 tar /data/00003.tar now"),
    ]
    for other, expected in cases:
        assert expected in _other_run(earlier, other)
    assert _other_run(earlier, manifest(revision=None)) is None  # a local folder: no commit to compare
    moved = manifest()
    moved["shards"][1]["source"] = "/elsewhere/00001.tar"
    assert "shard 1 is 00001 tar /data/00001.tar there, 00001 tar /elsewhere/00001.tar now" in _other_run(earlier, moved)


def test_resume_with_another_number_of_groups_says_so(tmp_path):
    from tp_siglip.encode_corpus import Corpus, Target, _resume_decision
    from tp_siglip.sources import ShardSpec

    def manifest(file_shards):
        specs = [ShardSpec(i, f"files-{i:05d}", "files", "", (f"{i}.jpg",)) for i in range(file_shards)]
        setup = {"model": "m", "dtype": "float32", "embedding": "pooler_output", "hidden_size": 4, "config": {},
                 "tokens": False, "normalized": True, "output_dtype": "float32", "max_num_patches": None, "shard_size": 100, "revision": None}  # fmt: skip
        return embeddings_dir.make_manifest(specs, **setup)

    # the same 2 files, written by 2 groups (one file shard each), resumed by 1 group (one file shard)
    corpus = Corpus(Target(tmp_path), [], earlier=manifest(2))
    problem, done = _resume_decision(corpus, manifest(1))
    assert done == [] and "as many groups (ranks / --tp) as the run that wrote it" in problem, problem
    file_corpus = Corpus(Target(tmp_path / ".e.safetensors.parts", tmp_path / "e.safetensors"), [], earlier=manifest(2))
    assert "groups" not in _resume_decision(file_corpus, manifest(1))[0]  # a file's plan never depends on the groups


def test_resume_refuses_plain_files_that_changed_since_the_run():
    from tp_siglip.encode_corpus import _other_run
    from tp_siglip.sources import ShardSpec

    def manifest(*files):  # one shard of plain files: a file added to the folder sorts into it, the name stays
        setup = {"model": "m", "dtype": "float32", "embedding": "pooler_output", "hidden_size": 4, "config": {},
                 "tokens": False, "normalized": True, "output_dtype": "float32", "max_num_patches": None, "shard_size": 100, "revision": None}  # fmt: skip
        return embeddings_dir.make_manifest([ShardSpec(0, "files-00000", "files", "", files)], **setup)

    earlier = manifest("a.jpg", "b.jpg")
    assert _other_run(earlier, manifest("a.jpg", "b.jpg")) is None
    assert "shard 0 is files-00000 files with other files there" in _other_run(earlier, manifest("0.jpg", "a.jpg", "b.jpg"))
    del earlier["shards"][0]["files_sha1"]  # an output written before shards recorded their files resumes as before
    assert _other_run(earlier, manifest("a.jpg", "b.jpg")) is None
