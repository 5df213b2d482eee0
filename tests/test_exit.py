"""A refused load, caught by the caller, never makes a rank abort at interpreter exit.

Seen before the fix: two ranks launched torchrun-style, one with a truncated checkpoint, each catching
``from_pretrained``'s error and returning 0; in about 1 launch in 12 the rank with the bad file died at
exit with ``terminate called without an active exception`` (SIGABRT): its re-raised error's traceback
held the frame that held the error (a reference cycle), which kept the process group alive into
interpreter teardown.

Here `tests/exit_rank.py` is launched 20 times, one pair of fresh processes after another (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by hand, as torchrun would). Of every five launches, three
truncate rank 1's checkpoint, one both, and one loads fine and then runs a forward that is refused
(a NaN in rank 1's pixels). Every process must exit 0, without a signal and without gloo's abort
message. (Forking the ranks from one pre-imported process would be cheaper, but did not reproduce the
abort: 0 in 40 launches, against 5 in 63 with fresh processes.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import save_file

from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer

HERE = Path(__file__).parent
LAUNCHES = 20
# no pooling head: the encoder is enough to be refused, and it keeps the checkpoint small
CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, vision_use_head=False)


def _checkpoints(root: Path) -> tuple[Path, Path]:
    """A small valid checkpoint and a copy whose weights file is cut in half."""
    config = SiglipVisionConfig(**CONFIG)
    good, broken = root / "good", root / "broken"
    for directory in (good, broken):
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config.to_dict()))
    state = {k: v.contiguous() for k, v in SiglipVisionTransformer(config, seed=1).state_dict().items()}
    save_file(state, str(good / "model.safetensors"))
    data = (good / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    return good, broken


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_pair(checkpoints: list[Path]) -> list[tuple[int, str]]:
    """Run both ranks of one launch to the end; each rank's return code and output."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", TP_SIGLIP_PG_TIMEOUT_S="60")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "exit_rank.py"), *map(str, checkpoints)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [(proc.returncode, output) for proc, output in zip(procs, outputs)]


def test_refused_load_then_normal_exit_never_aborts(tmp_path):
    good, broken = _checkpoints(tmp_path)
    died = []
    for launch in range(LAUNCHES):
        kind = {2: "forward", 4: "both"}.get(launch % 5, "rank 1")
        checkpoints = {"rank 1": [good, broken], "both": [broken, broken], "forward": [good, good]}[kind]
        for rank, (code, output) in enumerate(_launch_pair(checkpoints)):
            if code != 0 or "terminate called" in output:  # a negative code is the signal that killed it
                died.append(f"launch {launch} ({kind}) rank {rank}: return code {code}: {output[-400:]}")
            elif kind == "forward":  # rank 1 its own error, rank 0 told about it
                expected = "ValueError: pixel_values contain 1 NaN" if rank == 1 else "input check failed on rank(s) [1]"
                assert "LOADED" in output and expected in output, output
            elif rank == 0 and kind == "rank 1":  # the healthy rank heard why rank 1 failed
                assert "REFUSED: RuntimeError: loading failed on rank(s) [1]" in output, output
            else:  # a rank with the truncated file got its own error
                assert "REFUSED: CheckpointError" in output and "truncated" in output, output
    assert not died, f"{len(died)} of {2 * LAUNCHES} rank processes died at exit:\n" + "\n".join(died)
