#!/usr/bin/env python3
"""Writes the PyTorch checkpoint fixtures of models/tests/pth.rs without importing torch.

A `torch.save` file (the zip format, PyTorch >= 1.6) is a zip archive whose entries sit under one
folder, `<archive>/`:

    data.pkl              the object, pickled with protocol 2; every storage is a persistent id
                          ('storage', <storage class>, <key>, <location>, <numel>)
    .format_version       "1"
    .storage_alignment    "64"
    byteorder             "little"
    data/<key>            the raw bytes of storage <key>, native (here little-endian) order
    version               "3\n"
    .data/serialization_id

Entries are stored uncompressed, and each entry's data starts on a 64-byte boundary (the local
header's extra field is padded with an 'FB' record), so that torch can memory-map them.

A tensor pickles as `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
requires_grad, backward_hooks)` with `backward_hooks = collections.OrderedDict()`; an
`nn.Parameter` as `torch._utils._rebuild_parameter(tensor, requires_grad, OrderedDict())`; a state
dict is an `OrderedDict` carrying a `_metadata` attribute (pickled as BUILD state). To make pickle
write the same GLOBAL opcodes (`torch FloatStorage`, `torch._utils _rebuild_tensor_v2`) this script
registers stand-in modules named `torch` and `torch._utils` in sys.modules.

Usage: python3 make_pth.py [OUT_DIR]   (default: the folder of this script)
Writes small.pth (the fixture the tests read) and evil.pth (a pickle calling os.system).
The output is deterministic: running it again gives the same bytes.
"""

import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

# --- stand-ins for the torch modules, so that pickle names them as torch does -----------------

torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
torch._utils = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils

# Storage class name -> (struct format of one element, element size).
STORAGE_TYPES = {
    "FloatStorage": ("<f", 4),
    "HalfStorage": ("<e", 2),
    "BFloat16Storage": (None, 2),
    "DoubleStorage": ("<d", 8),
    "LongStorage": ("<q", 8),
    "IntStorage": ("<i", 4),
    "BoolStorage": ("<?", 1),
    "ByteStorage": ("<B", 1),
}
for _name in STORAGE_TYPES:
    _cls = type(_name, (), {"__module__": "torch"})
    _cls.__qualname__ = _name
    setattr(torch, _name, _cls)


def _module_function(module, name):
    def f(*args):
        raise RuntimeError("stand-in only: never called")

    f.__module__ = module.__name__
    f.__name__ = f.__qualname__ = name
    setattr(module, name, f)
    return f


rebuild_tensor_v2 = _module_function(torch_utils, "_rebuild_tensor_v2")
rebuild_parameter = _module_function(torch_utils, "_rebuild_parameter")


def bf16_bytes(values):
    """bfloat16 is the high half of an f32; the fixture only uses values exact in bf16."""
    out = b""
    for v in values:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        assert bits & 0xFFFF == 0, f"{v} is not exact in bfloat16"
        out += struct.pack("<H", bits >> 16)
    return out


class Storage:
    """One typed storage: its torch class name and its elements."""

    def __init__(self, kind, values):
        self.kind = kind
        self.values = list(values)
        self.key = None  # given in pickling order, as torch does

    def data(self):
        fmt, _ = STORAGE_TYPES[self.kind]
        if fmt is None:
            return bf16_bytes(self.values)
        return b"".join(struct.pack(fmt, v) for v in self.values)


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)

    def __reduce_ex__(self, protocol):
        return (
            rebuild_tensor_v2,
            (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()),
        )


class Parameter:
    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce_ex__(self, protocol):
        return (rebuild_parameter, (self.tensor, True, collections.OrderedDict()))


def contiguous(kind, values, size):
    stride, acc = [], 1
    for d in reversed(size):
        stride.insert(0, acc)
        acc *= d
    return Tensor(Storage(kind, values), 0, size, stride)


class TorchPickler(pickle.Pickler):
    def __init__(self, f):
        super().__init__(f, protocol=2)
        self.storages = []

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            if obj.key is None:
                obj.key = str(len(self.storages))
                self.storages.append(obj)
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", len(obj.values))
        return None


# --- the zip layout -------------------------------------------------------------------------

ALIGNMENT = 64


def write_archive(path, archive, pickled, storages):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:

        def record(name, data):
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            # Pad the local header's extra field so that the data starts aligned.
            header_end = zf.fp.tell() + 30 + len(info.filename.encode()) + 4
            pad = (-header_end) % ALIGNMENT
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            zf.writestr(info, data)

        record("data.pkl", pickled)
        record(".format_version", b"1")
        record(".storage_alignment", str(ALIGNMENT).encode())
        record("byteorder", b"little")
        for s in storages:
            record(f"data/{s.key}", s.data())
        record("version", b"3\n")
        record(".data/serialization_id", b"0" * 40)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def torch_save(obj, path, archive="archive"):
    out = io.BytesIO()
    p = TorchPickler(out)
    p.dump(obj)
    write_archive(path, archive, out.getvalue(), p.storages)


# --- the fixtures ---------------------------------------------------------------------------


def small_checkpoint():
    sd = collections.OrderedDict()
    # f32, contiguous.
    sd["blocks.0.attn.proj.weight"] = contiguous(
        "FloatStorage", [0.5 * i - 2.0 for i in range(12)], (3, 4)
    )
    # One f32 storage of 20 elements shared by two tensors: a [4, 5] row-major view and a
    # transposed [3, 4] view at storage offset 2 (element (i, j) = shared[2 + i + 5 j]).
    shared = Storage("FloatStorage", [0.25 * i - 1.0 for i in range(20)])
    sd["shared.base"] = Tensor(shared, 0, (4, 5), (5, 1))
    sd["shared.view_t"] = Tensor(shared, 2, (3, 4), (1, 5))
    # f16, values exact in half precision (65504 = largest finite half, 2^-14 = smallest normal).
    sd["norm.weight"] = contiguous("HalfStorage", [1.0, -0.5, 0.25, 65504.0, 2.0**-14], (5,))
    # i64 with negatives and a value past 32 bits.
    sd["pos.ids"] = contiguous("LongStorage", [0, -1, 7, 2**40, -(2**33), 123456789], (2, 3))
    # bf16.
    sd["emb.weight"] = contiguous("BFloat16Storage", [1.5, -2.25, 0.09375, 1024.0], (2, 2))
    # An nn.Parameter.
    sd["head.bias"] = Parameter(contiguous("FloatStorage", [0.1, -0.2, 0.3], (3,)))
    sd["mask"] = contiguous("BoolStorage", [True, False, True, True], (4,))
    sd["counts"] = contiguous("IntStorage", [3, -4, 2**31 - 1], (3,))
    sd["bytes"] = contiguous("ByteStorage", [0, 17, 255], (3,))
    # f64 0-dim tensor.
    sd["scale"] = Tensor(Storage("DoubleStorage", [0.125]), 0, (), ())
    # An empty tensor over an empty storage.
    sd["empty"] = contiguous("FloatStorage", [], (0, 3))
    # What nn.Module.state_dict() attaches.
    sd._metadata = collections.OrderedDict(
        [("", {"version": 1}), ("blocks.0.attn", {"version": 1})]
    )
    return {
        "model": sd,
        "epoch": 7,
        "step": 2**40,
        "config": {"lr": 0.001, "name": "tiny", "betas": (0.9, 0.95), "flag": None},
        "ema": [contiguous("FloatStorage", [4.0, 5.0], (2,))],
    }


def evil_pickle():
    """What `pickle.dumps` writes for an object whose __reduce__ calls os.system: GLOBAL
    'os system', the argument tuple, REDUCE. Written out byte by byte so that the module is 'os'
    on every platform (pickle itself would name posix or nt)."""
    cmd = b"echo pwned"
    return (
        b"\x80\x02"  # PROTO 2
        + b"cos\nsystem\n"  # GLOBAL os.system
        + b"X" + struct.pack("<I", len(cmd)) + cmd  # BINUNICODE
        + b"\x85"  # TUPLE1
        + b"R"  # REDUCE
        + b"."  # STOP
    )


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    torch_save(small_checkpoint(), os.path.join(out_dir, "small.pth"))
    write_archive(os.path.join(out_dir, "evil.pth"), "evil", evil_pickle(), [])


if __name__ == "__main__":
    main()
