"""Image folders at scale: the cached index, its invalidation, shards, lazy checks, the audit CLI."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from input_pipeline import check, folders
from input_pipeline.folders import INDEX_NAME, folder_source, load_index, skipped_files
from input_pipeline.sources import BadImageError, DatasetNotReadyError

GOOD = 7


def _image(path: Path, seed: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    shape = (8, 8, 3) if mode == "RGB" else (8, 8)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)


def _make_folder(root: Path, bad: bool = True) -> Path:
    """ants: 2 PNG + 1 JPEG; bees: 2 JPEG (+ a truncated one); cats: a PNG, a JPEG (+ text, hidden)."""
    for name in ("ants", "bees", "cats"):
        (root / name).mkdir(parents=True)
    _image(root / "ants" / "a1.png", 1)
    _image(root / "ants" / "a2.png", 2, "L")
    _image(root / "ants" / "a3.jpg", 3)
    _image(root / "bees" / "b1.jpg", 4)
    _image(root / "bees" / "b2.jpg", 5)
    _image(root / "cats" / "c1.png", 6)
    _image(root / "cats" / "c2.jpeg", 7)
    (root / "cats" / ".DS_Store").write_bytes(b"hidden")
    if bad:
        whole = (root / "bees" / "b1.jpg").read_bytes()
        (root / "bees" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
        (root / "cats" / "notes.jpg").write_text("not an image at all")
    return root


@pytest.fixture
def folder(tmp_path: Path, home: Path) -> Path:
    return _make_folder(tmp_path / "data")


def _good_bytes(root: Path) -> list[bytes]:
    return sorted(p.read_bytes() for p in root.glob("*/*") if not p.name.startswith(".")
                  and p.name not in ("truncated.jpg", "notes.jpg"))


def _images(ds) -> list[bytes]:
    return [e["image"] for e in ds.as_numpy_iterator()]


def _bump_mtime(path: Path) -> None:
    # Adding a file changes the folder's mtime; bumped further so coarse timestamps cannot hide it.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_index_is_written_then_reused(folder, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, "input_pipeline.folders"):
        source = folder_source(str(folder))
    assert "listed 9 files in 3 classes" in caplog.text
    assert source.class_names == ("ants", "bees", "cats") and source.num_examples == 9
    index = json.loads((folder / INDEX_NAME).read_text())
    files = {c["name"]: c["files"] for c in index["classes"]}
    assert files["cats"] == "c1.png/c2.jpeg/notes.jpg"  # no hidden file

    def no_listing(path):
        raise AssertionError(f"listed {path} again")

    monkeypatch.setattr(folders, "_list_folder", no_listing)
    caplog.clear()
    with caplog.at_level(logging.INFO, "input_pipeline.folders"):
        again = folder_source(str(folder))
    assert "using the cached index" in caplog.text and "listed" not in caplog.text
    assert again.class_names == source.class_names and again.num_examples == 9
    np.testing.assert_array_equal(load_index(str(folder)).labels(), [0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_changes_invalidate_the_index(folder, caplog):
    folder_source(str(folder))
    _image(folder / "bees" / "b3.png", 8)
    _bump_mtime(folder / "bees")
    with caplog.at_level(logging.INFO, "input_pipeline.folders"):
        source = folder_source(str(folder))
    assert source.num_examples == 10
    assert "re-listing" in caplog.text and "bees" in caplog.text
    (folder / "dogs").mkdir()
    _image(folder / "dogs" / "d1.png", 9)
    caplog.clear()
    with caplog.at_level(logging.INFO, "input_pipeline.folders"):
        source = folder_source(str(folder))
    assert "class folders added: dogs" in caplog.text
    assert source.class_names[-1] == "dogs" and source.num_examples == 11


def test_index_dir_and_read_only_root(folder, home, tmp_path, monkeypatch, caplog):
    folder_source(str(folder), index_dir=str(tmp_path / "indexes"))
    assert not (folder / INDEX_NAME).exists() and len(list((tmp_path / "indexes").glob("*.json"))) == 1

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) != str(folder) and real_access(p, mode, **kw))
    folder_source(str(folder))
    assert not (folder / INDEX_NAME).exists()
    assert len(list((home / "folder_index").glob("*.json"))) == 1
    with caplog.at_level(logging.INFO, "input_pipeline.folders"):
        assert folder_source(str(folder)).num_examples == 9
    assert f"using the cached index {home / 'folder_index'}" in caplog.text


def test_missing_empty_and_imageless_folders(tmp_path, home):
    with pytest.raises(DatasetNotReadyError, match="does not exist"):
        folder_source(str(tmp_path / "nowhere"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DatasetNotReadyError, match="no class sub-folders"):
        folder_source(str(tmp_path / "flat"))
    (tmp_path / "hollow" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetNotReadyError, match="no images"):
        folder_source(str(tmp_path / "hollow"))


def test_shards_are_disjoint_and_seed_permutes(tmp_path, home):
    root = _make_folder(tmp_path / "clean", bad=False)
    source = folder_source(str(root))
    everything = _images(source.make(0, 1))
    first, second = _images(source.make(0, 2)), _images(source.make(1, 2))
    assert (len(first), len(second)) == (4, 3) and not set(first) & set(second)
    assert sorted(first + second) == sorted(everything) == _good_bytes(root)
    shuffled = _images(source.make(0, 1, seed=3))
    assert shuffled == _images(source.make(0, 1, seed=3)) and shuffled != everything
    assert sorted(shuffled) == sorted(everything)
    assert sorted(_images(source.make(1, 2, seed=3))) == sorted(second)
    with pytest.raises(ValueError):
        source.make(2, 2)


def test_bad_files_are_dropped_logged_and_counted(folder, monkeypatch, caplog):
    source = folder_source(str(folder))
    calls = []
    real_add = folders._SKIPPED.add
    monkeypatch.setattr(folders._SKIPPED, "add", lambda root, path: calls.append(path) or real_add(root, path))
    with caplog.at_level(logging.WARNING, "input_pipeline.folders"):
        examples = list(source.make(0, 1).as_numpy_iterator())
    assert len(examples) == GOOD and sorted(e["image"] for e in examples) == _good_bytes(folder)
    assert [e["label"] for e in examples] == [0, 0, 0, 1, 1, 2, 2]
    assert sorted(os.path.basename(p) for p in calls) == ["notes.jpg", "truncated.jpg"]  # good files stay in TF
    text = caplog.text
    assert f"{folder / 'bees' / 'truncated.jpg'}: truncated JPEG" in text
    assert f"{folder / 'cats' / 'notes.jpg'}: not a JPEG, PNG, GIF or BMP" in text
    assert f"skipped 2 unreadable file(s) so far in {folder}" in text
    assert skipped_files(str(folder)) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, "input_pipeline.folders"):
        assert len(list(source.make(0, 1, seed=1).as_numpy_iterator())) == GOOD
    assert skipped_files(str(folder)) == 2 and not caplog.text  # once per file, not per epoch


def test_strict_names_the_first_bad_file(folder):
    with pytest.raises(BadImageError, match="truncated.jpg"):
        folder_source(str(folder), strict=True)
    assert folders.check_image(str(folder / "cats" / "c2.jpeg")) is None
    assert "cannot identify" in folders.check_image(str(folder / "cats" / "notes.jpg"))


def test_audit_cli(folder, tmp_path, capsys):
    assert check.main([str(folder), "--quiet"]) == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 2 and "truncated.jpg: " in bad[0] and "notes.jpg: " in bad[1]
    assert "checked 9 files" in out and "2 bad" in out

    dataset = tmp_path / "dataset"
    _make_folder(dataset / "train", bad=False)
    _make_folder(dataset / "val", bad=False)
    assert check.main([str(dataset), "--workers", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{dataset / 'train'}: checked 7 files" in out and f"{dataset / 'val'}: checked 7 files" in out

    assert check.main([str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_in_graph_check_matches_the_formats_tf_decodes():
    import io

    import tensorflow as tf

    encoded = {}
    for fmt in ("PNG", "JPEG", "GIF", "BMP"):
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(buffer, format=fmt)
        encoded[fmt] = buffer.getvalue()
    for fmt, data in encoded.items():
        assert int(folders.in_graph_problem(tf.constant(data))) == 0, fmt
        assert tf.io.decode_image(data, expand_animations=False).shape == (8, 8, 3)
    jpeg = encoded["JPEG"]
    cases = {b"": 1, b"hello": 2, jpeg[:-2]: 3, jpeg + b"\0" * 2000: 3}
    assert {data: int(folders.in_graph_problem(tf.constant(data))) for data in cases} == cases
