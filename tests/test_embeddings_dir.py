"""tp_siglip.embeddings_dir: the sharded output folder (img_emb/*.npy + metadata/*.parquet + stats last) written
by ShardWriter, read back with numpy/pyarrow and open_embeddings; completeness, resume checks, 3 million rows,
and processes killed mid-add / mid-commit never leaving a shard that looks complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tp_siglip import embeddings_dir as ed
from tp_siglip.embeddings_dir import (
    ShardWriter,
    completed_shards,
    make_manifest,
    read_manifest,
    remove_incomplete,
    write_manifest,
)
from tp_siglip.embeddings_reader import open_embeddings
from tp_siglip.sources import ShardSpec

SRC = str(Path(ed.__file__).resolve().parents[1])


def specs(count: int) -> list[ShardSpec]:
    return [ShardSpec(i, f"{i:05d}", "tar", f"/data/{i:05d}.tar") for i in range(count)]


def manifest_for(count: int, hidden: int = 4, **changes: object) -> dict:
    fields = {"model": "google/siglip-base-patch16-224", "dtype": "float32", "embedding": "pooler_output",
              "hidden_size": hidden, "config": {"hidden_size": hidden, "patch_size": 16}}  # fmt: skip
    fields.update(changes)
    return make_manifest(specs(count), **fields)


def shard_writer(root: Path, index: int) -> ShardWriter:
    return ShardWriter(root, index, f"{index:05d}", "pooler_output", source=f"/data/{index:05d}.tar", shard_count=12)


def rows_for(index: int, count: int, hidden: int = 4) -> tuple[list[str], list[dict], np.ndarray]:
    keys = [f"{index:04d}{n:05d}" for n in range(count)]
    metas = [{"url": f"https://x/{k}", "caption": f"c{k}", "key": k, "width": n, "status": "success"} for n, k in enumerate(keys)]
    embedding = (np.arange(count * hidden, dtype=np.float32).reshape(count, hidden) + 1000 * index) / 7
    return keys, metas, embedding


def write_shard(root: Path, index: int, count: int, hidden: int = 4, batch: int = 3) -> dict:
    keys, metas, embedding = rows_for(index, count, hidden)
    writer = shard_writer(root, index)
    for start in range(0, count, batch):
        stop = start + batch
        writer.add(keys[start:stop], metas[start:stop], {"pooler_output": embedding[start:stop]})
    return writer.commit([("bad", "truncated")] if count % 2 else [], seconds=1.5)


def test_shard_round_trip_with_numpy_and_pyarrow(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    write_manifest(tmp_path, manifest_for(2))
    writer = shard_writer(tmp_path, 1)
    keys = ["000000001", "000000002", "000000003"]
    metas = [{"url": "u1", "key": "000000001", "width": 3, "score": 1, "exif": {"a": 1}, "mixed": 1},
             {"url": "u2", "key": "other", "width": 4, "score": 0.5, "exif": None, "mixed": "x", "new": True},
             {}]  # fmt: skip
    embedding = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    tokens = torch.randn(3, 2, 4)
    mask = torch.tensor([[True, False], [True, True], [False, False]])
    writer.add(keys[:2], metas[:2], {"pooler_output": embedding[:2], "tokens": tokens[:2], "pixel_attention_mask": mask[:2]})
    writer.add(keys[2:], metas[2:], {"pooler_output": embedding[2:], "tokens": tokens[2:], "pixel_attention_mask": mask[2:]})
    stats = writer.commit([("000000009", "no image member (000000009.json only)")], seconds=2.25)
    assert stats["rows"] == 3 and stats["done"] is True and stats["skipped"] == [["000000009", "no image member (000000009.json only)"]]
    assert sorted(os.listdir(tmp_path)) == ["img_emb", "manifest.json", "metadata", "pixel_attention_mask", "stats", "tokens"]
    emb = np.load(tmp_path / "img_emb/img_emb_00001.npy", mmap_mode="r")
    assert emb.dtype == np.float32 and np.array_equal(emb, embedding.float().numpy())
    assert np.array_equal(np.load(tmp_path / "tokens/tokens_00001.npy"), tokens.numpy())
    assert np.load(tmp_path / "pixel_attention_mask/pixel_attention_mask_00001.npy").dtype == bool
    table = pq.read_table(tmp_path / "metadata/metadata_00001.parquet")
    assert table.column_names == ["key", "shard", "source", "url", "width", "score", "exif", "mixed", "meta_key", "new"]
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == keys and {r["shard"] for r in rows} == {"00001"} and rows[0]["source"] == "/data/00001.tar"
    assert [r["width"] for r in rows] == [3, 4, None] and str(table.schema.field("width").type) == "int64"
    assert [r["score"] for r in rows] == [1.0, 0.5, None] and str(table.schema.field("score").type) == "double"
    assert [r["exif"] for r in rows] == ['{"a": 1}', None, None] and [r["mixed"] for r in rows] == ["1", '"x"', None]
    assert [r["meta_key"] for r in rows] == [None, "other", None]  # img2dataset's own key column kept only when it differs
    assert completed_shards(tmp_path) == {1: json.loads((tmp_path / "stats/stats_00001.json").read_text())}
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # the spool is gone


def test_zero_row_shard_writes_only_stats(tmp_path: Path) -> None:
    write_manifest(tmp_path, manifest_for(1))
    stats = shard_writer(tmp_path, 0).commit([("a", "empty file (0 bytes)")], 0.1)
    assert stats["rows"] == 0 and stats["files"] == {}
    assert not (tmp_path / "img_emb").exists() and not (tmp_path / "metadata").exists()  # keeps autofaiss's pairing aligned
    assert list(completed_shards(tmp_path)) == [0]
    embeddings = open_embeddings(tmp_path)
    assert len(embeddings) == 0 and embeddings.dim == 4 and embeddings.keys() == [] and list(embeddings.iter_batches(2)) == []
    assert embeddings.shape == (0, 4) and embeddings[:].shape == (0, 4)  # 2-D, as faiss's index.add wants


def test_open_embeddings_across_shards(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_manifest(tmp_path, manifest_for(5))
    counts = {0: 4, 1: 0, 2: 5, 4: 3}  # shard 3 never written
    for index, count in counts.items():
        write_shard(tmp_path, index, count)
    expected = np.concatenate([rows_for(i, n)[2] for i, n in counts.items()])
    keys = [k for i, n in counts.items() for k in rows_for(i, n)[0]]
    embeddings = open_embeddings(tmp_path)
    assert "1 of 5 planned shard(s) are not complete" in caplog.text and embeddings.missing == [3]
    assert len(embeddings) == 12 and embeddings.shape == (12, 4) and embeddings.dim == 4 and len(embeddings.shards) == 3
    for index in (0, 3, 4, 11, -1, -12):
        assert np.array_equal(embeddings[index], expected[index])
    for part in (slice(None), slice(2, 7), slice(3, 4), slice(9, 2, -2), slice(10, 100), slice(5, 5)):
        assert np.array_equal(embeddings[part], expected[part])
    picks = np.array([11, 0, 4, 4, -3, 8])
    assert np.array_equal(embeddings[picks], expected[picks]) and np.array_equal(embeddings[[1, 9]], expected[[1, 9]])
    mask = np.arange(12) % 3 == 0
    assert np.array_equal(embeddings[mask], expected[mask]) and np.array_equal(embeddings[2:6, 1:3], expected[2:6, 1:3])
    assert embeddings[5, 2] == expected[5, 2] and embeddings[[]].shape == (0, 4)
    assert np.array_equal(np.concatenate(list(embeddings.iter_batches(5))), expected)
    assert [len(b) for b in embeddings.iter_batches(5)] == [5, 5, 2]
    assert embeddings.keys() == keys
    metadata = embeddings.metadata()
    assert metadata.num_rows == 12 and metadata.column("shard").to_pylist() == ["00000"] * 4 + ["00002"] * 5 + ["00004"] * 3
    assert metadata.column("width").to_pylist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2]
    assert embeddings.metadata(["caption", "key"]).column_names == ["caption", "key"]
    with pytest.raises(KeyError, match="no metadata column"):
        embeddings.metadata(["nope"])
    for bad in (12, -13, [0, 12], np.ones(3, bool)):
        with pytest.raises(IndexError):
            embeddings[bad]


def test_unfinished_safetensors_output_names_its_work_folder_which_reads_with_keys(tmp_path: Path) -> None:
    """A .safetensors output not written yet (its run going, or stopped early) is refused naming its work folder;
    that folder (keys in the stats files, no parquet) reads back with its keys."""
    work = tmp_path / ".emb.safetensors.parts"
    write_manifest(work, manifest_for(2))
    keys, _, embedding = rows_for(0, 3)
    writer = ShardWriter(work, 0, "00000", "pooler_output", source="/data/00000.tar", shard_count=2, metadata=False)
    writer.add(keys, [{}] * 3, {"pooler_output": embedding})
    writer.commit([], seconds=0.1)
    with pytest.raises(ValueError, match=r"not written yet.*--resume.*\.emb\.safetensors\.parts"):
        open_embeddings(tmp_path / "emb.safetensors")
    opened = open_embeddings(work)
    assert opened.keys() == keys and np.array_equal(opened[:], embedding) and opened.missing == [1]
    assert opened.metadata().column("shard").to_pylist() == ["00000"] * 3


def test_file_output_reads_its_other_tensors_like_the_folder(tmp_path: Path) -> None:
    """A .safetensors output's --tokens tensors read back memory-mapped, with the folder's array()/array_names()."""
    from safetensors.numpy import save_file

    embedding, tokens = np.arange(12, dtype=np.float16).reshape(3, 4), np.arange(24, dtype=np.float32).reshape(3, 2, 4)
    metadata = {"paths": json.dumps(["a", "b", "c"]), "embedding": "pooler_output"}
    save_file({"pooler_output": embedding, "last_hidden_state": tokens}, str(tmp_path / "e.safetensors"), metadata=metadata)
    opened = open_embeddings(tmp_path / "e.safetensors")
    assert np.array_equal(opened[:], embedding) and opened.dim == 4 and "3 rows x 4" in repr(opened)
    assert opened.array_names() == ["last_hidden_state"]
    assert np.array_equal(opened.array("last_hidden_state")[1:], tokens[1:])
    with pytest.raises(KeyError, match="no tensor 'tokens'"):
        opened.array("tokens")


def test_extra_arrays_and_mixed_metadata_types_across_shards(tmp_path: Path) -> None:
    write_manifest(tmp_path, manifest_for(2))
    for index, width in ((0, 5), (1, "wide")):
        writer = shard_writer(tmp_path, index)
        writer.add(["a", "b"], [{"width": width}, {}], {"pooler_output": np.ones((2, 4)) * index, "tokens": np.full((2, 3, 4), index, np.float64)})
        writer.commit([], 0.0)
    embeddings = open_embeddings(tmp_path)
    assert embeddings.array_names() == ["tokens"]
    tokens = embeddings.array("tokens")
    assert tokens.shape == (4, 3, 4) and tokens.dtype == np.float32 and tokens[3].tolist() == np.ones((3, 4)).tolist()
    assert embeddings.metadata(["width"]).column("width").to_pylist() == ["5", None, "wide", None]
    with pytest.raises(KeyError, match="no array 'nope'"):
        embeddings.array("nope")


def test_add_checks_its_arguments(tmp_path: Path) -> None:
    write_manifest(tmp_path, manifest_for(1))
    writer = shard_writer(tmp_path, 0)
    one = np.zeros((1, 4), np.float32)
    cases = [
        ((["a"], [{}], {"tokens": one}), "expected the embedding 'pooler_output'"),
        ((["a", "b"], [{}], {"pooler_output": one}), "2 keys, 1 metas"),
        ((["a"], ["meta"], {"pooler_output": one}), "not a dict"),
    ]
    for args, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            writer.add(*args)
    writer.add(["a"], [{}], {"pooler_output": one})
    with pytest.raises(ValueError, match=r"\(5,\).*expected .*\(4,\)"):
        writer.add(["b"], [{}], {"pooler_output": np.zeros((1, 5), np.float32)})
    with pytest.raises(ValueError, match="'tokens'.*expected"):
        writer.add(["b"], [{}], {"pooler_output": one, "tokens": one})
    writer.abort()
    with pytest.raises(ValueError, match="after commit"):
        writer.add(["b"], [{}], {"pooler_output": one})
    assert completed_shards(tmp_path) == {} and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_manifest_checks(tmp_path: Path) -> None:
    manifest = manifest_for(3)
    write_manifest(tmp_path, manifest)
    on_disk = read_manifest(tmp_path)
    assert on_disk == manifest and on_disk["format_version"] == 1 and on_disk["shards"][2] == {"index": 2, "name": "00002", "kind": "tar", "source": "/data/00002.tar"}
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match="upgrade tp-siglip"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="not a tp-siglip embeddings folder"):
        open_embeddings(tmp_path / "nothing")


def test_file_names_sort_in_shard_order(tmp_path: Path) -> None:
    assert [ed.index_width(n) for n in (1, 100_000, 100_001, 10**6 + 1)] == [5, 5, 6, 7]
    write_manifest(tmp_path, manifest_for(12))
    for index in (11, 2, 10, 0):
        write_shard(tmp_path, index, 2)
    names = sorted(os.listdir(tmp_path / "img_emb"))  # what autofaiss/embedding_reader reads, in this order
    assert names == ["img_emb_00000.npy", "img_emb_00002.npy", "img_emb_00010.npy", "img_emb_00011.npy"]
    assert sorted(os.listdir(tmp_path / "metadata")) == [n.replace("img_emb", "metadata").replace(".npy", ".parquet") for n in names]


def test_incomplete_shards_are_not_reported(tmp_path: Path) -> None:
    write_manifest(tmp_path, manifest_for(4))
    for index in range(4):
        write_shard(tmp_path, index, 3)
    (tmp_path / "img_emb/img_emb_00001.npy").write_bytes((tmp_path / "img_emb/img_emb_00001.npy").read_bytes()[:-4])  # cut
    stats = json.loads((tmp_path / "stats/stats_00002.json").read_text())
    (tmp_path / "stats/stats_00002.json").write_text(json.dumps({**stats, "rows": 4}))  # disagrees with the files
    (tmp_path / "metadata/metadata_00003.parquet").unlink()
    assert list(completed_shards(tmp_path)) == [0]
    removed = {p.name for p in remove_incomplete(tmp_path)}
    assert {"img_emb_00001.npy", "metadata_00001.parquet", "stats_00001.json", "stats_00002.json"} <= removed
    assert sorted(os.listdir(tmp_path / "img_emb")) == ["img_emb_00000.npy"]
    assert sorted(os.listdir(tmp_path / "stats")) == ["stats_00000.json"]


def test_rewrite_after_remove_incomplete_gives_the_same_files(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for root in (first, second):
        write_manifest(root, manifest_for(2))
        write_shard(root, 0, 7, batch=3)
    write_shard(first, 1, 9, batch=2)
    write_shard(second, 1, 9, batch=4)  # other add() sizes: same files
    (second / "stats/stats_00001.json").unlink()  # as if killed before the stats file
    remove_incomplete(second)
    write_shard(second, 1, 9, batch=5)
    for relative in ("img_emb/img_emb_00001.npy", "metadata/metadata_00001.parquet"):
        assert (first / relative).read_bytes() == (second / relative).read_bytes()
    assert (first / "stats/stats_00001.json").read_bytes() == (second / "stats/stats_00001.json").read_bytes()


def test_metadata_needs_pyarrow_with_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_manifest(tmp_path, manifest_for(1))
    writer = shard_writer(tmp_path, 0)
    writer.add(["a"], [{}], {"pooler_output": np.zeros((1, 4))})
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r'pip install "tp-siglip\[corpus\]"'):
        writer.commit([], 0.0)
    assert completed_shards(tmp_path) == {} and not (tmp_path / "img_emb/img_emb_00000.npy").exists()


def test_three_million_rows(tmp_path: Path) -> None:
    """More rows than a 100 MB safetensors JSON header could list (3e6 keys of ~16 bytes as JSON), spooled."""
    started = time.perf_counter()
    rows, batch = 3_000_000, 250_000
    write_manifest(tmp_path, manifest_for(1, hidden=2))
    writer = shard_writer(tmp_path, 0)
    empty: list[dict] = [{}] * batch
    for start in range(0, rows, batch):
        numbers = np.arange(start, start + batch)
        writer.add([f"k{n}" for n in range(start, start + batch)], empty, {"pooler_output": np.stack([numbers, -numbers], 1)})
    writer.commit([], 1.0)
    embeddings = open_embeddings(tmp_path)
    assert len(embeddings) == rows and embeddings.shape == (rows, 2)
    for index in (0, 1, 1_234_567, rows - 1):
        assert embeddings[index].tolist() == [index, -index]
    keys = embeddings.keys()
    assert len(keys) == rows and keys[1_234_567] == "k1234567" and keys[-1] == f"k{rows - 1}"
    assert time.perf_counter() - started < 60  # ~10 s on a quiet core


KILLED = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from tp_siglip import embeddings_dir as ed
    root, stage, nth = sys.argv[2], sys.argv[3], int(sys.argv[4])
    calls = {"n": 0}
    def dying(original):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == nth:
                os._exit(9)
            return original(*args, **kwargs)
        return wrapped
    if stage == "replace":
        ed.os.replace = dying(os.replace)
    elif stage in ("fsync", "loop"):
        ed.os.fsync = dying(os.fsync)
    writer = ed.ShardWriter(root, 0, "00000", "pooler_output", source="", shard_count=40)
    for step in range(5):
        if stage == "add" and step == nth:
            os._exit(9)
        writer.add([f"k{step}{i}" for i in range(100)], [{"i": i} for i in range(100)],
                   {"pooler_output": np.full((100, 4), step, np.float32), "tokens": np.zeros((100, 2, 4))})
    writer.commit([], 0.0)
    if stage == "loop":
        for index in range(1, 40):
            w = ed.ShardWriter(root, index, f"{index:05d}", "pooler_output", source="", shard_count=40)
            for step in range(20):
                w.add([f"k{i}" for i in range(2000)], [{}] * 2000, {"pooler_output": np.full((2000, 4), index, np.float32)})
            w.commit([], 0.0)
    """
)


def run_killed(root: Path, stage: str, nth: int) -> int:
    script = root.parent / "killed.py"
    script.write_text(KILLED)
    return subprocess.run([sys.executable, str(script), SRC, str(root), stage, str(nth)], timeout=120).returncode


@pytest.mark.parametrize(("stage", "points"), [("add", (0, 1, 4)), ("replace", (1, 2, 3, 4, 5)), ("fsync", (1, 2, 3, 7, 8, 9, 10))])
def test_killed_writer_never_leaves_a_complete_looking_shard(tmp_path: Path, stage: str, points: tuple[int, ...]) -> None:
    """Killed at the k-th add / os.replace / fsync (a commit makes 4 replaces and 9 fsyncs): nothing is complete
    before the stats file is in, and what a cleanup leaves is the manifest alone."""
    outcomes = []
    for nth in points:
        root = tmp_path / f"{stage}-{nth}"
        write_manifest(root, manifest_for(40))
        code = run_killed(root, stage, nth)
        complete = completed_shards(root)
        outcomes.append((code, bool(complete)))
        if code == 0 or complete:  # ran to the end, or killed after the stats file went in: every file is whole
            assert code == 0 or (root / "stats/stats_00000.json").exists()
            assert np.array_equal(open_embeddings(root)[::100, 0], np.arange(5, dtype=np.float32))
            continue
        assert code == 9
        remove_incomplete(root)
        assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["manifest.json"]
    assert (9, False) in outcomes


@pytest.mark.parametrize("nth", [12, 26, 49, 83])
def test_killed_mid_run_then_resume(tmp_path: Path, nth: int) -> None:
    """A process writing shard after shard dies at its ``nth`` fsync (a deterministic point: before, inside or
    between a shard's commits, over several shards): what completed_shards reports holds exactly its rows;
    remove_incomplete leaves only complete shards; writing the rest completes the folder."""
    root = tmp_path / "run"
    write_manifest(root, manifest_for(40))
    assert run_killed(root, "loop", nth) == 9
    complete = completed_shards(root)
    assert 0 < len(complete) < 40, complete
    for index, stats in complete.items():  # whatever reports complete holds exactly its rows
        emb = np.load(root / stats["files"]["img_emb"])
        assert emb.shape == (100 * 5 if index == 0 else 40_000, 4) and (index == 0 or (emb == index).all())
    assert remove_incomplete(root), "a spool folder or a half-committed shard is left to clear"
    assert [p for p in root.rglob("*") if p.name.startswith(".")] == []
    assert set(completed_shards(root)) == set(complete)
    for folder in ("img_emb", "metadata", "stats"):
        assert {int(p.stem.rsplit("_", 1)[1]) for p in (root / folder).glob("*_*.*")} == set(complete)
    for index in range(40):  # the resume: write what is missing
        if index not in complete:
            write_shard(root, index, 2)
    assert list(completed_shards(root)) == list(range(40))


def test_file_names_that_are_not_utf8_are_stored_escaped(tmp_path: Path) -> None:
    """A file named with bytes that are not UTF-8 (Python's surrogate escapes) is a key parquet cannot hold as it is."""
    write_manifest(tmp_path, manifest_for(1))
    writer = ShardWriter(tmp_path, 0, "files-00000", "pooler_output", source=os.fsdecode(b"/d/\xff.tar"), shard_count=1)
    names = [os.fsdecode(b"a/bad\xffname.png"), "a/ok.png"]
    metas = [{"image_path": name} for name in names]  # what a plain file's row carries
    writer.add(names, metas, {"pooler_output": np.ones((2, 4), np.float32)})
    assert writer.commit([], 0.1)["rows"] == 2
    assert open_embeddings(tmp_path).keys() == ["a/bad\\xffname.png", "a/ok.png"]
    metadata = open_embeddings(tmp_path).metadata()
    assert metadata.column("source").to_pylist() == ["/d/\\xff.tar"] * 2
    assert metadata.column("image_path").to_pylist() == ["a/bad\\xffname.png", "a/ok.png"]
