"""``tp-siglip encode`` on two nodes, simulated on one host: two ``torchrun --nnodes 2`` launches (static
rendezvous, so node 0 hosts the store and holds rank 0), each with its own arguments and ``TMPDIR``, as nodes
whose file systems differ would run them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import tiny_job_inputs

REPO = Path(__file__).resolve().parents[1]
#: a hang is a failure: the process-group timeout is longer than the launches may take
NODE_TIMEOUT_S, PG_TIMEOUT_S = 90, "300"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_job_inputs(tmp_path_factory.mktemp("multinode"), 4)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_nodes(tmp_path: Path, node_args: list[list[str]], ranks_per_node: int = 1) -> list[tuple[int, str]]:
    """Run ``-m tp_siglip.encode`` on two simulated nodes (``node_args[n]``: node n's arguments); returns each
    node's ``(exit status, output)``."""
    port, procs = _free_port(), []
    for node, args in enumerate(node_args):
        (tmp_path / f"tmp{node}").mkdir(exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", TP_SIGLIP_PG_TIMEOUT_S=PG_TIMEOUT_S, TMPDIR=str(tmp_path / f"tmp{node}"))
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                   "--nproc-per-node", str(ranks_per_node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "-m", "tp_siglip.encode", *args]
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [proc.communicate(timeout=NODE_TIMEOUT_S)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill() if proc.poll() is None else None
    return [(proc.returncode, log) for proc, log in zip(procs, logs)]


def test_a_check_failing_on_one_node_stops_the_other_at_once(job: tuple[Path, Path], tmp_path: Path) -> None:
    """Node 1 lacks an input (a folder not yet synced there): node 0's rank learns why at once, naming rank and
    node, instead of waiting in the first collective until the process-group timeout."""
    checkpoint, images = job
    there = [str(images / "0.png"), str(images / "1.png")]
    common = ["--model", str(checkpoint), "--output", str(tmp_path / "out"), "--workers", "0"]
    (node0, log0), (node1, log1) = two_nodes(tmp_path, [[*there, *common], [*there, str(tmp_path / "gone.png"), *common]])
    assert node0 != 0 and node1 != 0, log0 + log1
    assert f"[rank 1] error: input path does not exist: '{tmp_path / 'gone.png'}'" in log1, log1
    assert f"[rank 0] error: rank 1 (node 1, host {socket.gethostname()}): input path does not exist" in log0, log0


def test_an_output_folder_the_nodes_do_not_share_is_refused(job: tuple[Path, Path], tmp_path: Path) -> None:
    """Each node writes its groups' shards: a node whose --output is another folder (its own disk, a path
    that differs) would leave its shards out of rank 0's folder, which then says "run again with --resume"
    forever. Every rank stops before encoding, naming the node and the fix; node 1's folder stays empty."""
    checkpoint, images = job
    common = [str(images), "--model", str(checkpoint), "--workers", "0"]
    (tmp_path / "node1-disk").mkdir()
    outputs = [tmp_path / "shared", tmp_path / "node1-disk"]
    (node0, log0), (node1, log1) = two_nodes(tmp_path, [[*common, "--output", str(out)] for out in outputs])
    assert node0 != 0 and node1 != 0, log0 + log1
    fix = "is not the folder rank 0 writes"
    assert f"[rank 1] error: --output {outputs[1]} on this node {fix}" in log1, log1
    assert f"[rank 0] error: rank 1 (node 1, host {socket.gethostname()}): --output {outputs[1]} on this node {fix}" in log0, log0
    assert not list(outputs[1].iterdir()) and not list((outputs[0] / "stats").glob("*"))


def test_nodes_whose_checkpoints_differ_are_refused(job: tuple[Path, Path], tmp_path: Path) -> None:
    """Node 1's copy of --model holds other weights under the same config (not yet synced): its group would
    encode its shards with them, and exit 0. Every rank stops before encoding, naming both ranks."""
    from checkpoints import TINY, save_layout, vision_model

    checkpoint, images = job
    stale = save_layout(vision_model({**TINY, "image_size": 32, "patch_size": 16}, seed=4), "v5_vision", tmp_path / "stale")
    common = [str(images), "--output", str(tmp_path / "out"), "--workers", "0"]
    (node0, log0), (node1, log1) = two_nodes(tmp_path, [[*common, "--model", str(model)] for model in (checkpoint, stale)])
    assert node0 != 0 and node1 != 0, log0 + log1
    host = socket.gethostname()
    assert f"[rank 0] error: rank 1 (node 1, host {host}) loaded other weights from --model {checkpoint} than rank 0" in log0, log0
    assert not list((tmp_path / "out" / "stats").glob("*"))


def test_a_node_that_lists_fewer_files_is_named(job: tuple[Path, Path], tmp_path: Path) -> None:
    """Node 1's image folder lacks a file (not yet synced): every rank stops, naming the rank and node that differ."""
    checkpoint, images = job
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("0.png", "1.png", "2.png"):
        (partial / name).write_bytes((images / name).read_bytes())
    common = ["--model", str(checkpoint), "--output", str(tmp_path / "out"), "--workers", "0"]
    (node0, log0), (node1, log1) = two_nodes(tmp_path, [[str(images), *common], [str(partial), *common]])
    assert node0 != 0 and node1 != 0, log0 + log1
    expected = f"error: the ranks list different image files: rank 1 (node 1, host {socket.gethostname()}) found 2 shard(s)"
    assert f"[rank 0] {expected}" in log0 and f"[rank 1] {expected}" in log1, log0 + log1
