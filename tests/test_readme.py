"""The library calls of README.md and docs/vlm-server.md run as documented (examples/readme_snippet.py under torchrun, 2 ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_snippet_under_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TP_SIGLIP_PG_TIMEOUT_S="60")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(ROOT / "examples" / "readme_snippet.py"), str(tmp_path / "ckpt")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    for rank in range(2):
        assert f"rank {rank}/2: last_hidden_state (2, 16, 128), pooler_output (2, 128), 3 hidden states, " \
               f"interpolated (2, 48, 128)" in done.stdout
