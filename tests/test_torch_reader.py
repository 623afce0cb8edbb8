"""Torch-free checkpoint reader/writer: real reference files, hostile pickles, damaged files, round trips."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from conftest import fixture_path
from moebius_jax.convert import torch_pickle
from moebius_jax.convert.errors import CheckpointError, UnsafePickleError
from moebius_jax.convert.state_dict import (
    EmaCheckpoint,
    is_ema_file,
    read_ema_file,
    read_state_dict,
    write_ema_file,
    write_safetensors,
)
from moebius_jax.convert.torch_pickle import load_torch_file, save_torch_file

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _json(*parts: str) -> dict:
    return json.loads(fixture_path(*parts).read_text())


def _rewrite_zip(src, dst, edit) -> None:
    """Copy zip `src` to `dst`, passing each (name, data) through `edit`; None drops the entry."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = edit(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)


# ---------------------------------------------------------------- reference files


@pytest.fixture(scope="module")
def moebius_state() -> dict[str, np.ndarray]:
    # torch made unimportable while reading (it may be installed, and imported by other tests):
    # the reader must not need it.
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch", None)
        return read_state_dict(fixture_path("moebius_tiny", "diffusion_pytorch_model.bin"))


def test_moebius_bin_matches_key_list(moebius_state):
    expected = _json("moebius_tiny", "keys.json")["state_dict"]
    assert len(expected) == 1203
    got = [[k, list(v.shape), str(v.dtype)] for k, v in moebius_state.items()]
    assert got == expected  # names, shapes, dtypes and order
    # Values as the fixture README describes them.
    counts = [v for k, v in moebius_state.items() if k.endswith("num_batches_tracked")]
    assert len(counts) == 124 and all(c.shape == () and c == 0 for c in counts)
    variances = np.concatenate([v for k, v in moebius_state.items() if k.endswith("running_var")])
    assert 0.5 <= variances.min() and variances.max() <= 1.5
    assert all(v.flags.c_contiguous and v.flags.writeable for v in moebius_state.values())


def test_moebius_ema_file(moebius_state):
    path = fixture_path("moebius_tiny", "diffusion_pytorch_model.EMA.bin")
    assert is_ema_file(path) and not is_ema_file(path.with_name("diffusion_pytorch_model.bin"))
    ema = read_ema_file(path)
    assert isinstance(ema, EmaCheckpoint)
    param_names = [k for k, _, _ in _json("moebius_tiny", "keys.json")["state_dict"] if not k.endswith(BN_BUFFERS)]
    assert len(param_names) == 831 and list(ema.params) == param_names
    assert ema.decay == float(np.float32(0.9999)) and ema.num_updates == 0
    for name, shadow in ema.params.items():
        assert shadow.shape == moebius_state[name].shape and shadow.dtype == np.float32
        assert np.any(shadow != moebius_state[name]), name
    # Shadows = params + 0.01 N.
    diff = np.concatenate([(ema.params[k] - moebius_state[k]).ravel() for k in param_names])
    assert 0.0095 < diff.std() < 0.0105 and abs(diff.mean()) < 1e-4


@pytest.mark.parametrize("name", ["sdxl_latest_vgg16_tuned.w16.pth", "sdxl_latent_vgg16.w16.pth.tar"])
def test_elatentlpips_format_samples(name):
    spec = _json("elatentlpips", "format_samples", "format_samples.json")["files"][name]
    obj = load_torch_file(fixture_path("elatentlpips", "format_samples", name))
    if isinstance(spec, dict):  # the trunk file wraps its weights
        assert list(obj) == spec["top_level_keys"] and obj["best_acc1"] == 0.0
        spec = spec["state_dict"]
    state = read_state_dict(fixture_path("elatentlpips", "format_samples", name))
    assert list(state) == [k for k, *_ in spec]
    for key, shape, dtype, digest in spec:
        value = state[key]
        assert (list(value.shape), str(value.dtype)) == (shape, dtype), key
        # The digests are of the little-endian C-contiguous bytes.
        assert hashlib.sha256(value.astype(value.dtype.newbyteorder("<")).tobytes()).hexdigest() == digest, key
    if "tuned" in name:  # lin{k} and lins.{k} share one storage in the file
        for k in range(5):
            np.testing.assert_array_equal(state[f"lin{k}.model.1.weight"], state[f"lins.{k}.model.1.weight"])


# ---------------------------------------------------------------- small torch-written files

# Both files hold the same OrderedDict, saved by torch 2.13 (legacy and zip layouts):
# base = (arange(12) * 0.5 - 1).reshape(3, 4); views of it share its storage.
SMALL_EXPECTED = {
    "weight": np.array([[-1.0, -0.5, 0.0, 0.5], [1.0, 1.5, 2.0, 2.5], [3.0, 3.5, 4.0, 4.5]], np.float32),
    "weight_t": np.array([[-1.0, 1.0, 3.0], [-0.5, 1.5, 3.5], [0.0, 2.0, 4.0], [0.5, 2.5, 4.5]], np.float32),
    "row": np.array([1.5, 2.0, 2.5], np.float32),  # base[1, 1:]: storage offset 5
    "col": np.array([0.0, 2.0, 4.0], np.float32),  # base[:, 2]: offset 2, stride 4
    "step": np.array(7, np.int64),
    "half": np.array([1.5, -2.0, 65504.0], np.float16),
    "bf16": np.array([1.0, -0.5, 3.0], ml_dtypes.bfloat16),
    "mask": np.array([True, False, True]),
    "param": np.array([[0.25, -4.0]], np.float32),  # an nn.Parameter
    "empty": np.zeros((0, 3), np.float32),
}


@pytest.mark.parametrize("name", ["legacy_small.pth", "zip_small.pth"])
def test_small_torch_files(name):
    obj = load_torch_file(fixture_path("formats", name))
    assert type(obj) is dict and list(obj) == list(SMALL_EXPECTED)
    for key, expected in SMALL_EXPECTED.items():
        got = obj[key]
        assert type(got) is np.ndarray and got.dtype == expected.dtype and got.shape == expected.shape, key
        assert got.flags.c_contiguous, key
        np.testing.assert_array_equal(got, expected, err_msg=key)


def test_damaged_legacy_stream(tmp_path):
    data = fixture_path("formats", "legacy_small.pth").read_bytes()
    stream = io.BytesIO(data)
    for _ in range(5):  # magic, protocol, sys_info, object, storage keys: skip without unpickling
        for _ in pickletools.genops(stream):
            pass
    first_storage = stream.tell()
    cases = {
        "half": (data[: len(data) // 2], "corrupt checkpoint"),
        "short": (data[:-3], "stream ends inside storage"),
        "header": (data[:20], "before the protocol version"),
        "count": (
            data[:first_storage] + (10**15).to_bytes(8, "little") + data[first_storage + 8 :],
            "size header says 1000000000000000 elements",
        ),
    }
    for case, (damaged, message) in cases.items():
        path = tmp_path / f"{case}.pth"
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=message) as err:
            load_torch_file(path)
        assert str(path) in str(err.value)


# ---------------------------------------------------------------- hostile pickles


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _text(value: str) -> bytes:
    return pickle.BINUNICODE + struct.pack("<I", len(value)) + value.encode()


def _int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def _ints(*values: int) -> bytes:
    return pickle.MARK + b"".join(map(_int, values)) + pickle.TUPLE


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: str) -> list[tuple[bytes, str]]:
    """(pickle bytes, the global it asks for); none of them is ever unpickled for real."""
    calls = [  # (callable, args, protocol): GLOBAL, STACK_GLOBAL and text-mode opcodes
        (os.system, (f"touch {marker}",), 2),
        (eval, (f"__import__('os').system('touch {marker}')",), 4),
        (subprocess.call, (["touch", marker],), 0),
    ]
    out = [
        (
            pickle.dumps(_Payload(func, *args), protocol=protocol, fix_imports=False),
            f"{func.__module__}.{func.__name__}",
        )
        for func, args, protocol in calls
    ]
    # A torch global outside the whitelist, nested inside an otherwise valid state dict.
    call = _global("torch", "load") + pickle.MARK + _text("x.pt") + pickle.TUPLE + pickle.REDUCE
    state_dict = pickle.EMPTY_DICT + _text("w") + call + pickle.SETITEM
    out.append((pickle.PROTO + b"\x02" + state_dict + pickle.STOP, "torch.load"))
    return out


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("layout", ["zip", "legacy_header", "legacy_main"])
def test_refuses_code_execution(tmp_path, index, layout):
    marker = tmp_path / "pwned"
    payload, global_name = _payloads(str(marker))[index]
    path = tmp_path / "evil.bin"
    if layout == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("evil/data.pkl", payload)
            zf.writestr("evil/byteorder", "little")
    elif layout == "legacy_header":  # the very first pickle is hostile
        path.write_bytes(payload)
    else:
        header = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}]
        path.write_bytes(b"".join(pickle.dumps(h, protocol=2) for h in header) + payload)
    with pytest.raises(UnsafePickleError) as err:
        load_torch_file(path)
    assert global_name in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


# A valid 2-element float tensor reference, as torch writes it.
_TENSOR_OPS = (
    _global("torch._utils", "_rebuild_tensor_v2")
    + pickle.MARK
    + pickle.MARK + _text("storage") + _global("torch", "FloatStorage") + _text("0") + _text("cpu") + _int(2)
    + pickle.TUPLE + pickle.BINPERSID
    + _int(0) + _ints(2) + _ints(1) + pickle.NEWFALSE + pickle.TUPLE + pickle.REDUCE
)


@pytest.mark.parametrize(
    "target",
    [
        _TENSOR_OPS,  # rewrite a validated tensor's stride to -1 (an out-of-bounds read)
        _global("torch._utils", "_rebuild_tensor_v2"),  # alter a shared stand-in for later loads
        _global("collections", "OrderedDict"),
    ],
)
def test_refuses_pickled_state_on_stand_ins(tmp_path, target):
    state = pickle.EMPTY_DICT + _text("stride") + _ints(-1) + pickle.SETITEM
    path = tmp_path / "build.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("build/data.pkl", pickle.PROTO + b"\x02" + target + state + pickle.BUILD + pickle.STOP)
        zf.writestr("build/data/0", np.array([1.0, 2.0], np.float32).tobytes())
    with pytest.raises(CheckpointError, match="state|argument"):
        load_torch_file(path)
    # The tensor itself is fine without the BUILD, and later loads are unaffected.
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("build/data.pkl", pickle.PROTO + b"\x02" + _TENSOR_OPS + pickle.STOP)
        zf.writestr("build/data/0", np.array([1.0, 2.0], np.float32).tobytes())
    assert load_torch_file(path).tolist() == [1.0, 2.0]


# ---------------------------------------------------------------- damaged zip files


def test_truncated_zip_names_the_file(tmp_path):
    data = fixture_path("moebius_tiny", "diffusion_pytorch_model.bin").read_bytes()
    path = tmp_path / "half.bin"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="zip") as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


def test_damaged_zip_records(tmp_path):
    src = fixture_path("formats", "zip_small.pth")
    cases = {
        "missing_storage": (lambda n, d: None if n == "zip_small/data/0" else d, "zip_small/data/0' is missing"),
        "short_storage": (lambda n, d: d[:-4] if n == "zip_small/data/0" else d, "holds 44 bytes, expected 48"),
        "no_pickle": (lambda n, d: None if n.endswith("data.pkl") else d, "data.pkl"),
        "bad_byteorder": (lambda n, d: b"middle" if n.endswith("byteorder") else d, "byteorder"),
    }
    for case, (edit, message) in cases.items():
        path = tmp_path / f"{case}.pth"
        _rewrite_zip(src, path, edit)
        with pytest.raises(CheckpointError, match=message) as err:
            load_torch_file(path)
        assert str(path) in str(err.value), case


def test_big_endian_zip(tmp_path):
    small = tmp_path / "small.pt"
    save_torch_file(small, {"w": np.array([1.5, -2.0], np.float32), "n": np.array(3, np.int64)})
    swapped = {"small/data/0": np.dtype("u4"), "small/data/1": np.dtype("u8")}

    def to_big(name, data):
        if name.endswith("byteorder"):
            return b"big"
        dtype = swapped.get(name)
        if dtype is None:
            return data
        return np.frombuffer(data, dtype.newbyteorder("<")).astype(dtype.newbyteorder(">")).tobytes()

    path = tmp_path / "big.pt"
    _rewrite_zip(small, path, to_big)
    obj = load_torch_file(path)
    np.testing.assert_array_equal(obj["w"], [1.5, -2.0])
    assert obj["n"] == 3 and obj["w"].dtype == np.float32 and obj["w"].dtype.isnative


# ---------------------------------------------------------------- writing


ALL_DTYPES = {
    "f32": np.array([[1.0, -2.5], [3.25, 1e-30]], np.float32),
    "f16": np.array([0.5, -65504.0, 6e-8], np.float16),
    "bf16": np.array([[1.0, -3.0e38, 0.0078125]], ml_dtypes.bfloat16),
    "f64": np.array([np.pi, -1e300], np.float64),
    "i64": np.array([-(2**62), 0, 2**40], np.int64),
    "i32": np.array([-(2**31), 2**31 - 1], np.int32),
    "u8": np.arange(250, 256, dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "scalar_f32": np.array(3.25, np.float32),
    "scalar_i64": np.array(-11, np.int64),
    "empty": np.zeros((0, 3), np.float32),
}


def _bits(a: np.ndarray) -> tuple:
    return a.dtype, a.shape, a.tobytes()


def test_save_load_round_trip_is_bit_identical(tmp_path):
    path = tmp_path / "all.bin"
    obj = collections.OrderedDict(ALL_DTYPES)
    obj["transposed"] = np.arange(12, dtype=np.float32).reshape(3, 4).T  # written C-contiguous
    obj["big_endian"] = np.arange(3, dtype=">f4")
    obj["meta"] = {"epoch": 3, "lr": 1e-4, "name": "moebius", "huge": 2**70, "neg": -300000, "ok": True, "none": None}
    save_torch_file(path, obj)
    back = load_torch_file(path)
    assert type(back) is dict and list(back) == list(obj)
    for key, value in ALL_DTYPES.items():
        assert _bits(back[key]) == _bits(value), key
    np.testing.assert_array_equal(back["transposed"], obj["transposed"])
    assert back["big_endian"].dtype == np.float32 and back["big_endian"].tolist() == [0.0, 1.0, 2.0]
    assert back["meta"] == obj["meta"]
    # Data records start on 64-byte boundaries (torch.load(mmap=True) can map them).
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        assert {n.split("/", 1)[0] for n in zf.namelist()} == {"all"}
        for info in zf.infolist():
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_save_rejects_unsupported_values(tmp_path):
    with pytest.raises(TypeError, match=r"\['c'\].*complex"):
        save_torch_file(tmp_path / "x.bin", {"a": {"c": np.zeros(2, np.complex64)}})
    with pytest.raises(TypeError, match="set"):
        save_torch_file(tmp_path / "x.bin", {"a": {1, 2}})
    assert not os.listdir(tmp_path)


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.bin"
    save_torch_file(path, {"w": np.ones(2, np.float32)})
    before = path.read_bytes()
    real_write = torch_pickle._write_record
    calls = []

    def failing_write(*args):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of an export
        real_write(*args)

    monkeypatch.setattr(torch_pickle, "_write_record", failing_write)
    with pytest.raises(KeyboardInterrupt):
        save_torch_file(path, {"w": np.zeros(2, np.float32)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.bin"]


# ---------------------------------------------------------------- state_dict.py


def test_safetensors_round_trip(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = dict(ALL_DTYPES, transposed=np.arange(6, dtype=np.float32).reshape(2, 3).T)
    write_safetensors(path, tensors, metadata={"format": "np"})
    back = read_state_dict(path)
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert _bits(back[key]) == _bits(np.asarray(value, order="C")), key


def test_read_state_dict_unwraps_and_validates(tmp_path):
    weights = {"a.weight": np.ones((2, 2), np.float32), "a.bias": np.zeros(2, np.float32)}
    wrapped = tmp_path / "last.ckpt"
    save_torch_file(wrapped, {"epoch": 4, "state_dict": weights, "global_step": 10})
    back = read_state_dict(wrapped)
    assert list(back) == list(weights) and all(_bits(back[k]) == _bits(v) for k, v in weights.items())

    nested = tmp_path / "nested.pt"
    save_torch_file(nested, {"model": weights, "epoch": 4, "w": weights["a.bias"]})
    message = r"2 entries are not: 'model': dict with 2 entries; 'epoch': int"
    with pytest.raises(CheckpointError, match=message) as err:
        read_state_dict(nested)
    assert str(nested) in str(err.value)
    with pytest.raises(CheckpointError, match="found list"):
        save_torch_file(tmp_path / "l.pt", [weights["a.bias"]])
        read_state_dict(tmp_path / "l.pt")
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        read_state_dict(tmp_path / "nothing.bin")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint suffix '.npz'"):
        read_state_dict(tmp_path / "w.npz")


def test_write_ema_file_reference_layout(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        "embedding_layer.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "diff_model.conv_in.conv_dw.weight": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
        "diff_model.conv_in.bn1.bias": rng.standard_normal(2).astype(np.float32),
    }
    path = tmp_path / "diffusion_pytorch_model.EMA.bin"
    write_ema_file(path, params, decay=0.9999, num_updates=17)
    raw = load_torch_file(path)
    assert list(raw) == ["ema_buffers", "ema_name_map"]
    buffers = raw["ema_buffers"]
    assert list(buffers) == [
        "decay",
        "num_updates",
        "embedding_layerweight",
        "diff_modelconv_inconv_dwweight",
        "diff_modelconv_inbn1bias",
    ]
    assert _bits(buffers["decay"]) == _bits(np.array(0.9999, np.float32))
    assert _bits(buffers["num_updates"]) == _bits(np.array(17, np.int32))
    assert raw["ema_name_map"] == {name: name.replace(".", "") for name in params}
    ema = read_ema_file(path)
    assert ema.num_updates == 17 and ema.decay == float(np.float32(0.9999))
    assert list(ema.params) == list(params) and all(_bits(ema.params[k]) == _bits(v) for k, v in params.items())
    with pytest.raises(ValueError, match="both become EMA buffer 'ab'"):
        write_ema_file(tmp_path / "x.EMA.bin", {"a.b": np.ones(1, np.float32), "ab": np.ones(1, np.float32)}, 0.9, 0)


def test_malformed_ema_files(tmp_path):
    shadow = np.ones(2, np.float32)
    decay, count = np.array(0.999, np.float32), np.array(3, np.int32)
    counters = {"decay": decay, "num_updates": count}
    cases = {
        "missing_shadow": (
            {"ema_buffers": {**counters, "ab": shadow}, "ema_name_map": {"a.b": "ab", "c.d": "cd"}},
            r"'c.d' -> ema_buffers\['cd'\]: missing",
        ),
        "unmapped_shadow": (
            {"ema_buffers": {**counters, "ab": shadow, "zz": shadow}, "ema_name_map": {"a.b": "ab"}},
            r"ema_buffers\['zz'\] is not in ema_name_map",
        ),
        "no_decay": ({"ema_buffers": {"num_updates": count}, "ema_name_map": {}}, r"ema_buffers\['decay'\]"),
        "no_name_map": ({"ema_buffers": {"decay": decay, "num_updates": count}}, "'ema_name_map', found no such key"),
        "plain_state_dict": ({"a.b": shadow}, "'ema_buffers'"),
    }
    for case, (obj, message) in cases.items():
        path = tmp_path / f"{case}.EMA.bin"
        save_torch_file(path, obj)
        with pytest.raises(CheckpointError, match=message) as err:
            read_ema_file(path)
        assert str(path) in str(err.value), case
