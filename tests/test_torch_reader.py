"""flaxnets.torch_reader against torch.load, on both torch.save formats, and on hostile or wrong files."""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

from flaxnets.torch_reader import UnsafeCheckpointError, read_torch_checkpoint

FORMATS = ["zip", "legacy"]


def _save(obj: object, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    return path


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _assert_matches_torch_load(path: Path) -> dict[str, np.ndarray]:
    ours = read_torch_checkpoint(path)
    ref = torch.load(path, weights_only=True)
    ref = ref.get("state_dict", ref.get("model", ref))
    assert list(ours) == list(ref)
    for key, tensor in ref.items():
        want = _numpy(tensor.detach())
        assert (ours[key].dtype, ours[key].shape) == (want.dtype, want.shape), key
        assert ours[key].flags.c_contiguous, key
        np.testing.assert_array_equal(ours[key], want, err_msg=key)
    return ours


@pytest.mark.parametrize("fmt", FORMATS)
def test_dtypes_views_and_scalars_match_torch_load(tmp_path: Path, fmt: str) -> None:
    base = torch.arange(20.0).reshape(4, 5)
    obj = {
        "f32": torch.randn(2, 3), "f16": torch.randn(4).half(), "f64": torch.randn(2).double(),
        "i64_scalar": torch.tensor(7), "f32_scalar": torch.tensor(1.5),
        "i32": torch.arange(3, dtype=torch.int32),
        "u8": torch.arange(4, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "bf16": torch.randn(3, 2).bfloat16(), "empty": torch.zeros(0, 3),
        # Views sharing one storage, one at an offset, one transposed.
        "corner": base[1:, 2:], "transposed": base.T,
    }
    ours = _assert_matches_torch_load(_save(obj, tmp_path / "ckpt.pth", fmt))
    assert ours["bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours["bf16"].astype(np.float32), obj["bf16"].float().numpy())


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict_plain_and_wrapped(tmp_path: Path, fmt: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    sd = model.state_dict()
    # Shaped like an optimizer's state_dict: int keys, lists, floats, tensors outside the model's.
    optimizer = {"state": {0: {"momentum_buffer": torch.ones(4, 3, 3, 3)}},
                 "param_groups": [{"lr": 0.1, "params": [0]}]}
    for name, obj in [("plain", sd), ("params", dict(model.named_parameters())),
                      ("wrapped", {"state_dict": sd, "epoch": 3}),
                      ("model", {"model": sd, "optimizer": optimizer})]:
        ours = _assert_matches_torch_load(_save(obj, tmp_path / f"{name}.pth", fmt))
        assert ours.keys() == (sd.keys() if name != "params" else dict(model.named_parameters()).keys())
    assert ours["1.num_batches_tracked"].dtype == np.int64 and ours["1.num_batches_tracked"].shape == ()


def test_big_endian_and_compressed_zip(tmp_path: Path) -> None:
    obj = {"f32": torch.randn(3), "c64": torch.randn(2, dtype=torch.complex64), "i64": torch.arange(3)}
    little = _save(obj, tmp_path / "ckpt.pth", "zip")
    big = tmp_path / "big.pth"
    big_dtypes = {"0": ">f4", "1": ">f4", "2": ">i8"}  # complex64 swaps per float32 component
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            folder, _, leaf = info.filename.partition("/")
            if leaf == "byteorder":
                data = b"big"
            elif leaf.startswith("data/"):
                swapped = big_dtypes[leaf.removeprefix("data/")]
                data = np.frombuffer(data, swapped.replace(">", "<")).astype(swapped).tobytes()
            dst.writestr(f"{folder}/{leaf}", data)
    ours = read_torch_checkpoint(big)
    for key, tensor in obj.items():
        np.testing.assert_array_equal(ours[key], tensor.numpy())
    _assert_matches_torch_load(big)


class _Marker:
    """Stands for a storage (pickled as a persistent id) or a tensor (a _rebuild_tensor_v2 call)."""

    def __init__(self, reduce: tuple | None = None) -> None:
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def test_legacy_storage_views(tmp_path: Path) -> None:
    # torch < 0.4 wrote storages that were views of others: ids end in (view key, offset, size).
    root, view = _Marker(), _Marker()
    ids = {id(root): ("storage", torch.FloatStorage, "root", "cpu", 10, None),
           id(view): ("storage", torch.FloatStorage, "root", "cpu", 10, ("view", 3, 6))}
    rebuild = torch._utils._rebuild_tensor_v2
    obj = {"whole": _Marker((rebuild, (root, 0, (2, 5), (5, 1), False, collections.OrderedDict()))),
           "part": _Marker((rebuild, (view, 1, (2, 2), (1, 2), False, collections.OrderedDict())))}

    class LegacyPickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> tuple | None:
            return ids.get(id(obj))

    path = tmp_path / "old.pth"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        LegacyPickler(f, protocol=2).dump(obj)
        pickle.dump(["root"], f, protocol=2)
        f.write(np.int64(10).tobytes() + np.arange(10, dtype="<f4").tobytes())
    ours = _assert_matches_torch_load(path)
    np.testing.assert_array_equal(ours["part"], [[4, 6], [5, 7]])


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["zip", "legacy", "raw_pickle_in_zip"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    obj = {"w": torch.ones(2), "x": _Evil(marker)}
    if how == "raw_pickle_in_zip":  # a hand-made archive, with a top folder torch would not choose
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("weights/data.pkl", pickle.dumps(_Evil(marker), protocol=4))
            archive.writestr("weights/byteorder", "little")
    else:
        _save(obj, path, how)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_checkpoint(path)
    message = str(info.value)
    assert f"'{os.system.__module__}.system'" in message and str(path) in message and "\n" not in message
    assert not marker.exists()


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    path = _save(nn.Linear(2, 2), tmp_path / "model.pth", "zip")
    with pytest.raises(ValueError, match=r"refusing to load 'torch\.nn\.modules\.linear\.Linear'"):
        read_torch_checkpoint(path)


def _with_edited_pickle(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    with zipfile.ZipFile(src) as archive_in, zipfile.ZipFile(dst, "w") as archive_out:
        for info in archive_in.infolist():
            data = archive_in.read(info)
            if info.filename.endswith("/data.pkl"):
                assert data.count(old) == 1
                data = data.replace(old, new)
            archive_out.writestr(info.filename, data)
    return dst


def test_tensor_reaching_past_its_storage_is_refused(tmp_path: Path) -> None:
    # data.pkl spells the 4-float tensor's size as BININT1 4, TUPLE1 and its stride as BININT1 1, TUPLE1.
    src = _save({"w": torch.zeros(4)}, tmp_path / "ckpt.pth", "zip")
    for name, old, new in [("size", b"K\x04\x85", b"Kd\x85"), ("stride", b"K\x01\x85", b"K\x02\x85")]:
        path = _with_edited_pickle(src, tmp_path / f"{name}.pth", old, new)
        with pytest.raises(ValueError, match="not a PyTorch checkpoint .*past the end of its storage"):
            read_torch_checkpoint(path)


@pytest.mark.parametrize("obj", [[torch.ones(2)], {"net": {"w": torch.ones(2)}, "step": 3}])
def test_checkpoint_without_state_dict(tmp_path: Path, obj: object) -> None:
    with pytest.raises(ValueError, match="holds no state dict"):
        read_torch_checkpoint(_save(obj, tmp_path / "ckpt.pth", "zip"))


def _not_checkpoints(tmp_path: Path) -> dict[str, Path]:
    real = _save({"w": torch.randn(64, 64)}, tmp_path / "real.pth", "zip").read_bytes()
    legacy = _save({"w": torch.randn(64, 64)}, tmp_path / "legacy.pth", "legacy").read_bytes()
    files = {
        "text": b"hello, not weights\n", "empty": b"", "truncated_zip": real[: len(real) // 2],
        "truncated_legacy": legacy[: len(legacy) - 100], "plain_pickle": pickle.dumps({"w": [1.0, 2.0]}),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.pth"
        paths[name].write_bytes(data)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "just a zip")
    paths["other_zip"] = tmp_path / "other.zip"
    paths["directory"] = tmp_path / "orbax_ckpt"
    paths["directory"].mkdir()
    return paths


def test_not_a_checkpoint(tmp_path: Path) -> None:
    for name, path in _not_checkpoints(tmp_path).items():
        with pytest.raises(ValueError) as info:
            read_torch_checkpoint(path)
        message = str(info.value)
        assert "not a PyTorch checkpoint" in message and str(path) in message and "\n" not in message, name
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_torch_checkpoint(tmp_path / "missing.pth")


def test_reading_leaves_torch_unimported(tmp_path: Path) -> None:
    path = _save({"w": torch.randn(3, 3), "b": torch.zeros(3).bfloat16()}, tmp_path / "ckpt.pth", "zip")
    legacy = _save({"w": torch.randn(3, 3)}, tmp_path / "legacy.pth", "legacy")
    code = (
        "import sys\n"
        "from flaxnets.torch_reader import read_torch_checkpoint\n"
        f"assert read_torch_checkpoint({str(path)!r})['w'].shape == (3, 3)\n"
        f"assert read_torch_checkpoint({str(legacy)!r})['w'].shape == (3, 3)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
