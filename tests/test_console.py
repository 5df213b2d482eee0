"""Lines the command-line tools print (`tp_siglip.console`): whole lines, one write each, one rank's prefix each.

Two ranks failing to load at once used to glue their error lines (``...HF_HUB_OFFLINE=1.[rank 0] error: ...``):
``print(..., file=sys.stderr)`` wrote the text and its newline separately. The unit tests pin the cause
(one ``os.write`` per line); the torchrun test runs the real case, two ranks refusing a checkpoint.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from tp_siglip import console

REPO = Path(__file__).resolve().parents[1]


def test_rank_prefix():
    assert console.rank_prefix(0, 1) == ""
    assert console.rank_prefix(1, 2) == "[rank 1] "
    assert console.rank_prefix(7, 16) == "[rank 7] "


def test_each_line_is_one_os_write(tmp_path, monkeypatch):
    writes: list[bytes] = []
    real_write = os.write

    def recording_write(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(console.os, "write", recording_write)
    with open(tmp_path / "err.txt", "w", encoding="utf-8") as stream:
        console.write_line("[rank 1] error: first", stream)
        console.write_line("[rank 0] error: second\n", stream)  # a trailing newline is not doubled
    assert writes == [b"[rank 1] error: first\n", b"[rank 0] error: second\n"]
    assert (tmp_path / "err.txt").read_text(encoding="utf-8") == "[rank 1] error: first\n[rank 0] error: second\n"


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(console.os, "write", lambda fd, data: real_write(fd, data[:3]))  # a pipe taking 3 bytes at a time
    with open(tmp_path / "err.txt", "w", encoding="utf-8") as stream:
        console.write_line("ünïcode line", stream)
    assert (tmp_path / "err.txt").read_text(encoding="utf-8") == "ünïcode line\n"


def test_stream_without_a_file_descriptor_gets_one_write():
    class Recorder(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def write(self, text: str) -> int:
            self.calls.append(text)
            return super().write(text)

    stream = Recorder()
    console.write_line("result", stream)
    assert stream.calls == ["result\n"]


def test_printer_results_on_rank_0_only_and_errors_prefixed(capsys):
    console.Printer(1, 2)("not shown")
    console.Printer(0, 2)("shown")
    console.Printer(1, 2).error("bad file")
    console.Printer(0, 1).error("alone")
    captured = capsys.readouterr()
    assert captured.out == "shown\n"
    assert captured.err == "[rank 1] error: bad file\nerror: alone\n"


def test_setup_logging_uses_the_rank_prefix(monkeypatch):
    root = logging.getLogger()
    stream = io.StringIO()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(sys, "stderr", stream)
    console.setup_logging(3, 4)
    logging.getLogger("tp_siglip.test").warning("watch out")
    console.setup_logging(0, 1)  # a second call leaves the handler in place, like logging.basicConfig
    assert len(root.handlers) == 1
    assert stream.getvalue() == "[rank 3] WARNING tp_siglip.test: watch out\n"


def test_two_failing_ranks_print_one_line_each(tmp_path):
    model = tmp_path / "no-weights"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 32, "num_attention_heads": 4}')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TP_SIGLIP_PG_TIMEOUT_S": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "tp_siglip.encode", "--model", str(model), "--output", str(tmp_path / "out.safetensors")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode != 0, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    ranked = [line for line in lines if "[rank " in line]
    for line in ranked:  # every line that a rank printed is that rank's line alone
        assert re.match(r"^\[rank [01]\] ", line), line
        assert line.count("[rank ") == 1, line
    errors = [line for line in ranked if line.startswith(("[rank 0] error: ", "[rank 1] error: "))]
    assert sorted(line[:8] for line in errors) == ["[rank 0]", "[rank 1]"], done.stderr
    for line in errors:
        assert line.endswith("(looked for model.safetensors and an index)."), line
    assert done.stdout == ""  # nothing on stdout: the job never started
