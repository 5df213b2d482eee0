"""Vectors an index can use as they are: the stored embedding is L2-normalised by default, so faiss's
inner-product index (what autofaiss and clip-retrieval build) ranks by cosine similarity; ``--no-normalize``
keeps the tower's raw output and ``--output-dtype float16`` halves the files, in both outputs.

The reference is transformers on the same weights and files; the tower is random but its embeddings point
in many directions (checked), so the raw inner product ranks differently from the cosine (also checked).
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from safetensors import safe_open

from tp_siglip import encode, open_embeddings

from checkpoints import TINY, save_layout, transformers_outputs, vision_model

CONFIG = {**TINY, "image_size": 32, "patch_size": 8}
IMAGES = 24
TOLERANCE = 2e-3


def _write_images(folder: Path) -> list[Path]:
    """Smooth coloured gradients with noise: images whose embeddings differ in direction, not only in norm."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[0:32, 0:32] / 31
    paths = []
    for i in range(IMAGES):
        base, across, down = (rng.uniform(-1, 1, (1, 1, 3)) for _ in range(3))
        pixels = np.clip(base + across * columns[..., None] + down * rows[..., None] + 0.3 * rng.standard_normal((32, 32, 3)), -1, 1)
        path = folder / f"{i:02d}.png"
        Image.fromarray(((pixels + 1) * 127.5).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint, the images, and transformers' raw pooler_output for each image (in path order)."""
    root = tmp_path_factory.mktemp("index")
    model, paths = vision_model(CONFIG, seed=3), _write_images(root / "images")
    raw = transformers_outputs(model, paths, CONFIG["image_size"]).pooler_output.numpy()
    return root, save_layout(model, "v5_vision", root / "checkpoint"), paths, raw


def _encode(setup, output: Path, *options: str) -> None:
    root, checkpoint, _, _ = setup
    code = encode.main([str(root / "images"), "--model", str(checkpoint), "--output", str(output), "--workers", "0", *options])
    assert code == 0


def _in_path_order(corpus, paths: list[Path]) -> np.ndarray:
    where = {key: row for row, key in enumerate(corpus.keys())}
    return np.asarray(corpus[[where[str(p)] for p in paths]], dtype=np.float32)


def test_inner_product_index_ranks_by_cosine(setup, tmp_path):
    _, _, paths, raw = setup
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    cosine = unit @ unit.T
    off_diagonal = cosine[~np.eye(IMAGES, dtype=bool)]
    assert off_diagonal.mean() < 0.5 and off_diagonal.min() < 0  # not nearly collinear: a ranking means something
    raw_top = np.argsort(-(raw @ raw.T), axis=1)[:, :5]
    assert (raw_top != np.argsort(-cosine, axis=1)[:, :5]).any()  # raw vectors in an IP index would rank otherwise

    _encode(setup, tmp_path / "emb", "--shard-size", "7")  # 4 shards (7+7+7+3): the index reads them in order
    corpus = open_embeddings(tmp_path / "emb")
    assert corpus.manifest["normalized"] is True and corpus.manifest["output_dtype"] == "float32"
    vectors = _in_path_order(corpus, paths)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.abs(vectors - unit).max() <= TOLERANCE

    index = faiss.IndexFlatIP(corpus.dim)
    index.add(np.ascontiguousarray(corpus[:], dtype=np.float32))  # as stored, no normalize_L2
    scores, rows = index.search(vectors, IMAGES)
    keys = corpus.keys()
    assert corpus.metadata().column("image_path").to_pylist() == keys  # what clip-retrieval's back step returns
    order = {str(p): i for i, p in enumerate(paths)}
    found = np.array([[order[keys[r]] for r in row] for row in rows])
    for query in range(IMAGES):
        expected = np.sort(cosine[query])[::-1]
        # the k-th hit has the k-th best cosine (ties within the tolerance may swap places), with that score
        np.testing.assert_allclose(cosine[query, found[query]], expected, atol=TOLERANCE)
        np.testing.assert_allclose(scores[query], expected, atol=TOLERANCE)
        assert found[query, 0] == query


def test_raw_float16_folder_and_file(setup, tmp_path):
    _, _, paths, raw = setup
    _encode(setup, tmp_path / "raw", "--no-normalize", "--output-dtype", "float16")
    corpus = open_embeddings(tmp_path / "raw")
    assert corpus.dtype == np.float16 and corpus.manifest["normalized"] is False
    assert np.load(sorted((tmp_path / "raw" / "img_emb").glob("*.npy"))[0]).dtype == np.float16
    np.testing.assert_allclose(_in_path_order(corpus, paths), raw, rtol=5e-3, atol=TOLERANCE * 5)

    output = tmp_path / "emb.safetensors"
    _encode(setup, output, "--output-dtype", "float16")
    with safe_open(str(output), framework="pt") as file:
        stored, metadata = file.get_tensor("pooler_output"), file.metadata()
    assert stored.dtype == torch.float16 and metadata["normalized"] == "true" and metadata["output_dtype"] == "float16"
    by_path = dict(zip(json.loads(metadata["paths"]), stored.float()))
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.abs(np.stack([by_path[str(p)].numpy() for p in paths]) - unit).max() <= TOLERANCE
    opened = open_embeddings(output)  # the file reads like the folder: memory-mapped rows, keys
    assert opened.dtype == np.float16 and opened.dim == raw.shape[1] and opened.info["normalized"] == "true"
    assert opened.keys() == json.loads(metadata["paths"]) and np.array_equal(opened[:], stored.numpy())
