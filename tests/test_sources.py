"""tp_siglip.sources: shard plans from files, folders, path lists, brace patterns, webdataset tars and parquet
shards made like img2dataset makes them (9-digit keys, json sidecars, real PNG/JPEG bytes); rows listed from
headers only; read_bytes returns the exact bytes; truncated and malformed shards handled as documented."""

from __future__ import annotations

import io
import json
import pickle
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tp_siglip import sources
from tp_siglip.sources import ImageRef, ShardSpec, describe, expand_braces, find_shards, list_rows, read_bytes


def image_bytes(seed: int, fmt: str = "PNG", size: int = 8) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def sample_meta(key: str, status: str = "success") -> dict:
    return {"url": f"https://example.com/{key}.jpg", "caption": f"photo {key}", "key": key, "status": status,
            "error_message": None, "width": 8, "height": 8, "original_width": 640, "original_height": 480,
            "exif": "{}", "sha256": "ab" * 32}  # fmt: skip


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tar(path: Path, count: int, first: int = 0, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """An img2dataset-style shard: KEY.jpg (even) or KEY.png (odd), KEY.json, KEY.txt; returns key -> image bytes."""
    images = {}
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for number in range(first, first + count):
            key = f"{number:09d}"
            suffix, fmt = (".jpg", "JPEG") if number % 2 == 0 else (".png", "PNG")
            images[key] = image_bytes(number, fmt)
            add_member(tar, key + suffix, images[key])
            add_member(tar, key + ".json", json.dumps(sample_meta(key)).encode())
            add_member(tar, key + ".txt", f"photo {key}".encode())
        for name, data in (extra or {}).items():
            add_member(tar, name, data)
    return images


def make_parquet(path: Path, count: int, row_group_size: int = 3, failed: tuple[int, ...] = ()) -> dict[str, bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [f"{number:09d}" for number in range(count)]
    images = {key: image_bytes(100 + i, "JPEG") for i, key in enumerate(keys)}
    metas = [sample_meta(key, "failed_to_download" if i in failed else "success") for i, key in enumerate(keys)]
    columns = {name: [meta[name] for meta in metas] for name in metas[0] if name != "key"}
    columns["error_message"] = ["404" if i in failed else None for i in range(count)]
    table = pa.table({"key": keys, "jpg": [None if i in failed else images[k] for i, k in enumerate(keys)], **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return images


# ---------------------------------------------------------------------------------------------------- planning


def test_brace_patterns_expand_with_padding_steps_lists() -> None:
    assert expand_braces("s/{00000..00003}.tar") == [f"s/{i:05d}.tar" for i in range(4)]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{0..6..3}") == ["0", "3", "6"]
    assert expand_braces("{03..01}") == ["03", "02", "01"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    for bad in ("{1..x}", "{single}", "{1..5..0}"):
        with pytest.raises(ValueError, match="brace pattern"):
            expand_braces(bad)


def test_plan_orders_shards_as_given_and_names_them(tmp_path: Path) -> None:
    for number in range(3):
        make_tar(tmp_path / f"{number:05d}.tar", 1)
    (tmp_path / "other").mkdir()
    make_tar(tmp_path / "other" / "00001.tar", 1)
    make_parquet(tmp_path / "00000.parquet", 2)
    plan = find_shards([str(tmp_path / "{00000..00002}.tar"), tmp_path / "other/00001.tar", tmp_path / "00000.parquet"])
    assert [(s.index, s.name, s.kind) for s in plan.shards] == [
        (0, "00000", "tar"), (1, "00001", "tar"), (2, "00002", "tar"), (3, "00001-2", "tar"), (4, "00000-2", "parquet"),
    ]  # fmt: skip
    assert plan.shards[3].source == str(tmp_path / "other/00001.tar")
    again = find_shards([str(tmp_path / "{00000..00002}.tar"), tmp_path / "other/00001.tar", tmp_path / "00000.parquet"])
    assert again == plan  # deterministic
    assert pickle.loads(pickle.dumps(plan.shards)) == plan.shards


def test_missing_shard_in_a_pattern_is_named(tmp_path: Path) -> None:
    make_tar(tmp_path / "00000.tar", 1)
    make_tar(tmp_path / "00002.tar", 1)
    with pytest.raises(FileNotFoundError, match=r"3 path\(s\), 1 of them missing: '.*00001\.tar'"):
        find_shards([str(tmp_path / "{00000..00002}.tar")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_shards([tmp_path / "nope.tar"])
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="compressed tar"):
        find_shards([tmp_path / "x.tar.gz"])
    with pytest.raises(ValueError, match="no inputs"):
        find_shards([])


def test_plain_files_from_args_folders_and_lists_are_chunked(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.png", ".hidden.png", "notes.md"):
        (photos / name).write_bytes(image_bytes(1))
    make_tar(tmp_path / "00000.tar", 1)
    listing = tmp_path / "lists" / "more.txt"
    listing.parent.mkdir()
    listing.write_text("# comment\n\n  ../photos/a.jpg  \n/abs/x.jpg\nrel/y.png\n../00000.tar\n")
    plan = find_shards([tmp_path / "00000.tar", photos, listing, photos / "b.png"], rows_per_file_shard=2)
    kinds = [(s.name, s.kind) for s in plan.shards]
    assert kinds == [("00000", "tar"), ("files-00000", "files"), ("files-00001", "files"), ("files-00002", "files")]
    files = [file for s in plan.shards for file in s.files]
    # folder order as scan_images gives it, then the list (relative to the list's folder), duplicates once
    assert files == [str(photos / "a.jpg"), str(photos / "b.png"), str(photos / "sub/c.png"), "/abs/x.jpg", str(listing.parent / "rel/y.png")]
    assert plan.ignored == Counter({".md": 1}) and plan.hidden == 1
    assert "files-00001" in describe(plan.shards[2]) and "2 file(s)" in describe(plan.shards[2])


def test_plain_files_are_cut_into_at_least_one_shard_per_group(tmp_path: Path) -> None:
    for name in "abcde":
        (tmp_path / f"{name}.png").write_bytes(image_bytes(0))
    sizes = lambda plan: [len(s.files) for s in plan.shards]  # noqa: E731
    assert sizes(find_shards([tmp_path], rows_per_file_shard=10, min_file_shards=2)) == [2, 3]
    assert sizes(find_shards([tmp_path], rows_per_file_shard=10, min_file_shards=8)) == [1] * 5  # no empty shards
    assert sizes(find_shards([tmp_path], rows_per_file_shard=2, min_file_shards=2)) == [2, 2, 1]  # already enough


def test_files_chunk_takes_the_place_of_the_first_plain_input(tmp_path: Path) -> None:
    make_tar(tmp_path / "00000.tar", 1)
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    plan = find_shards([tmp_path / "a.png", tmp_path / "00000.tar"])
    assert [s.name for s in plan.shards] == ["files-00000", "00000"]
    rows = list_rows(plan.shards[0])
    path = str(tmp_path / "a.png")
    assert rows == [sources.Row(path, ImageRef("file", path), {"image_path": path})]
    assert read_bytes(rows[0].ref) == (tmp_path / "a.png").read_bytes()


def test_bad_list_file_lines(tmp_path: Path) -> None:
    nested = tmp_path / "outer.txt"
    nested.write_text("a.jpg\ninner.txt\n")
    with pytest.raises(ValueError, match=r"outer\.txt' line 2: 'inner\.txt' is another \.txt list"):
        find_shards([nested])
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"a.jpg\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        find_shards([binary])
    nul = tmp_path / "nul.txt"
    nul.write_text("a\x00b.jpg\n")
    with pytest.raises(ValueError, match="line 1: contains a NUL"):
        find_shards([nul])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert find_shards([empty]).shards == []


def test_list_saved_with_a_byte_order_mark_keeps_its_first_path(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes("a.jpg\r\nb.jpg\r\n".encode("utf-8-sig"))  # Notepad / PowerShell: BOM and CRLF
    (shard,) = find_shards([listing]).shards
    assert shard.files == (str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"))


def test_listed_missing_file_fails_at_read_time_with_file_not_found(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("gone.jpg\n")
    (row,) = list_rows(find_shards([listing]).shards[0])
    with pytest.raises(FileNotFoundError):
        read_bytes(row.ref)


# ---------------------------------------------------------------------------------------------------- tar shards


def test_tar_rows_from_headers_exact_bytes_and_meta(tmp_path: Path) -> None:
    images = make_tar(tmp_path / "00000.tar", 5)
    spec = find_shards([tmp_path / "00000.tar"]).shards[0]
    rows = list_rows(spec)
    assert [row.key for row in rows] == sorted(images)
    for row in rows:
        assert row.problem is None and row.ref.kind == "tar"
        assert read_bytes(row.ref) == images[row.key]
        assert row.meta["url"] == f"https://example.com/{row.key}.jpg" and row.meta["caption"] == f"photo {row.key}"
        assert row.meta["width"] == 8 and row.meta["status"] == "success"
    assert pickle.loads(pickle.dumps(rows[0].ref)) == rows[0].ref
    assert json.loads(json.dumps([row.meta for row in rows]))  # JSON-able


def test_tar_listing_does_not_read_image_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = make_tar(tmp_path / "00000.tar", 3)
    read_sizes: list[int] = []

    class Spy:
        def __init__(self, file: io.BufferedReader) -> None:
            self.file = file

        def read(self, size: int = -1) -> bytes:
            data = self.file.read(size)
            read_sizes.append(len(data))
            return data

        def __getattr__(self, name: str) -> object:
            return getattr(self.file, name)

        def __enter__(self) -> Spy:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    monkeypatch.setattr(sources, "open", lambda *args, **kwargs: Spy(open(*args, **kwargs)), raising=False)  # noqa: SIM115
    assert len(list_rows(ShardSpec(0, "00000", "tar", str(tmp_path / "00000.tar")))) == 3
    assert read_sizes and not set(read_sizes) & {len(data) for data in images.values()}, "image bytes were read while listing"


def test_bad_members_missing_images_and_ignored(tmp_path: Path) -> None:
    extra = {
        "000000100.json": json.dumps(sample_meta("000000100")).encode(),  # json only: no image
        "000000101.txt": b"caption only",
        "000000102.jpg": image_bytes(5, "JPEG")[:40],  # truncated image bytes: fine at this level
        "000000102.json": b"{not json",
        "000000103.jpg": image_bytes(6, "JPEG"),
        "000000103.png": image_bytes(7, "PNG"),  # second image for one key
        "000000104.parquet": b"x",
        "000000104.jpg": image_bytes(8, "JPEG"),
        "README": b"hi",
        "sub/.hidden.jpg": b"x",
        "sub/000000105.webp": image_bytes(9, "WEBP"),
    }
    make_tar(tmp_path / "00000.tar", 1, extra=extra)
    rows = {row.key: row for row in list_rows(ShardSpec(0, "00000", "tar", str(tmp_path / "00000.tar")))}
    assert list(rows) == sorted(rows)
    assert rows["000000100"].ref is None and rows["000000100"].problem == "no image member (000000100.json only)"
    assert rows["000000100"].meta["url"].endswith("000000100.jpg")
    assert rows["000000101"].problem == "no image member (000000101.txt only)" and rows["000000101"].meta == {"caption": "caption only"}
    assert read_bytes(rows["000000102"].ref) == extra["000000102.jpg"]
    assert "not valid JSON" in rows["000000102"].meta["meta_error"]
    assert read_bytes(rows["000000103"].ref) == extra["000000103.jpg"]  # the first image member wins
    assert read_bytes(rows["sub/000000105"].ref) == extra["sub/000000105.webp"]
    assert not [key for key in rows if "hidden" in key or "README" in key]  # hidden and unknown members are no rows


def test_truncated_tar_keeps_complete_rows(tmp_path: Path) -> None:
    images = make_tar(tmp_path / "00000.tar", 6)
    data = (tmp_path / "00000.tar").read_bytes()
    spec = ShardSpec(0, "00000", "tar", str(tmp_path / "cut.tar"))
    with tarfile.open(tmp_path / "00000.tar") as tar:
        members = tar.getmembers()
    image_member = next(m for m in members if m.name.startswith("000000004."))
    (tmp_path / "cut.tar").write_bytes(data[: image_member.offset_data + 10])  # cut mid image member
    rows = list_rows(spec)
    assert [row.key for row in rows if row.ref] == sorted(images)[:4]
    assert all(read_bytes(row.ref) == images[row.key] for row in rows if row.ref)
    assert rows[-1].key == "000000004" and "cut off (truncated tar)" in rows[-1].problem
    header_at = next(m for m in members if m.name.startswith("000000005.")).offset
    (tmp_path / "cut.tar").write_bytes(data[: header_at + 100])  # cut inside a member header
    rows = list_rows(spec)
    assert [row.key for row in rows if row.ref] == sorted(images)[:5]
    assert rows[-1].key == "(end of tar)" and rows[-1].ref is None and "truncated tar" in rows[-1].problem


def test_unreadable_shards_raise_naming_the_shard(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match=r"cannot read shard 0 'junk' \(tar .*junk\.tar\).*is it a tar file\?"):
        list_rows(ShardSpec(0, "junk", "tar", str(tmp_path / "junk.tar")))
    with pytest.raises(ValueError, match="cannot read shard 0 'gone'.*FileNotFoundError") as gone:
        list_rows(ShardSpec(0, "gone", "tar", str(tmp_path / "gone.tar")))
    assert "is it a tar file" not in str(gone.value)  # the file is missing, not something else
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(ValueError, match="cannot read shard 1 'junk'"):
        list_rows(ShardSpec(1, "junk", "parquet", str(tmp_path / "junk.parquet")))
    with pytest.raises(ValueError, match="unknown shard kind"):
        list_rows(ShardSpec(2, "x", "zip", "x.zip"))
    with pytest.raises(ValueError, match="unknown ImageRef kind"):
        read_bytes(ImageRef("zip", "x"))


def test_tar_read_detects_short_member(tmp_path: Path) -> None:
    (tmp_path / "t.tar").write_bytes(b"abc")
    with pytest.raises(ValueError, match="ends 7 bytes early"):
        read_bytes(ImageRef("tar", str(tmp_path / "t.tar"), 0, 10))


# ---------------------------------------------------------------------------------------------------- parquet shards


def test_parquet_rows_meta_status_and_exact_bytes(tmp_path: Path) -> None:
    images = make_parquet(tmp_path / "00000.parquet", 7, row_group_size=3, failed=(4,))
    rows = list_rows(find_shards([tmp_path / "00000.parquet"]).shards[0])
    assert [row.key for row in rows] == sorted(images)
    assert [(row.ref.offset, row.ref.size) for row in rows if row.ref] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0)]
    assert rows[4].ref is None and rows[4].problem == "img2dataset status 'failed_to_download': 404"
    for row in rows:
        assert "jpg" not in row.meta and "key" not in row.meta and row.meta["caption"] == f"photo {row.key}"
        if row.ref is not None:
            assert read_bytes(row.ref) == images[row.key]
    with pytest.raises(ValueError, match="no image bytes"):
        read_bytes(ImageRef("parquet", str(tmp_path / "00000.parquet"), 1, 1))
    with pytest.raises(ValueError, match="row 9 does not exist"):
        read_bytes(ImageRef("parquet", str(tmp_path / "00000.parquet"), 1, 9))


def test_parquet_row_group_is_read_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    make_parquet(tmp_path / "00000.parquet", 6, row_group_size=3)
    rows = list_rows(ShardSpec(0, "00000", "parquet", str(tmp_path / "00000.parquet")))
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: reads.append(i) or original(self, i, **kw))
    sources._ROW_GROUPS.clear()
    for row in rows:
        read_bytes(row.ref)
    assert reads == [0, 1]


def test_parquet_without_image_column_and_hf_image_structs(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["a"], "url": ["u"]}), tmp_path / "meta.parquet")
    with pytest.raises(ValueError, match="no image column.*give the .tar"):
        list_rows(ShardSpec(0, "meta", "parquet", str(tmp_path / "meta.parquet")))
    data = image_bytes(3)
    pq.write_table(pa.table({"image": [{"bytes": data, "path": "x.png"}], "label": [3]}), tmp_path / "hf.parquet")
    (row,) = list_rows(ShardSpec(0, "hf", "parquet", str(tmp_path / "hf.parquet")))
    assert row.key == "hf/000000000" and row.meta == {"label": 3} and read_bytes(row.ref) == data  # unique across shards


def test_tar_and_parquet_take_every_image_suffix_a_folder_takes(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tp_siglip.processing import IMAGE_SUFFIXES

    formats = {".gif": "GIF", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
    assert set(formats) == IMAGE_SUFFIXES
    members = {f"{i:09d}{suffix.upper() if i % 2 else suffix}": image_bytes(i, fmt) for i, (suffix, fmt) in enumerate(sorted(formats.items()))}
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = list_rows(find_shards([tmp_path / "00000.tar"]).shards[0])
    assert [read_bytes(row.ref) for row in rows] == list(members.values())  # a .gif is an image member
    data = image_bytes(9, "GIF")
    pq.write_table(pa.table({"key": ["a"], "gif": [data]}), tmp_path / "gif.parquet")
    (row,) = list_rows(ShardSpec(0, "gif", "parquet", str(tmp_path / "gif.parquet")))
    assert read_bytes(row.ref) == data


def test_parquet_needs_pyarrow_with_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r'pip install "tp-siglip\[corpus\]"'):
        list_rows(ShardSpec(0, "x", "parquet", str(tmp_path / "x.parquet")))
