"""Decoding the native extension's keys (csrc/): a key back into the op and its argument values.

A key is the op id, the context (snapshot) id, flags, the backward module, then each argument
(a default flag and a tagged value) and, after ``OUTPUTS``, the output values. The tags are the
extension's own enum ``Tag`` (csrc/native.h, bound in csrc/bindings.cpp), read from the loaded
module (``Tags``): there is no second copy here. ``KEY_VERSION`` is the key layout this decoder
reads; ``check_key_version`` refuses an extension of another layout when it loads. Tensors decode to their shapes (or meta tensors, or integer tensors
where the values were recorded, for formulas that read tensors); NativeCapture (capture.py) books
what decodes through the one formula registry.
"""
from __future__ import annotations

import functools
import math
import struct
import warnings

import torch

from ...errors import NativeContractError

KEY_VERSION = 3  # the key layout this decoder reads (csrc/native.h kKeyVersion)


def check_key_version(lib, expected: int | None = None) -> None:
    """Refuse an extension whose keys this decoder would misread (NativeContractError)."""
    expected = KEY_VERSION if expected is None else expected
    found = getattr(lib, "KEY_VERSION", None)
    if found != expected:
        raise NativeContractError(
            f"flopcount: the native extension writes keys of version {found}, this flopcount reads version "
            f"{expected}; rebuild it with `flopcount build-native` (or use backend='dispatch')")


class Tags:
    """The extension's key tags as plain ints (its enum ``Tag``), read once per loaded module."""

    def __init__(self, lib) -> None:
        for name, member in lib.Tag.__members__.items():
            setattr(self, name, int(member))
        self.OUTPUTS = int(lib.OUTPUTS)
        self.AFTER_TENSOR = (self.VALUES, self.PENDING_VALUES, self.TENSOR_DTYPE)


@functools.lru_cache(maxsize=4)
def tags(lib) -> Tags:
    return Tags(lib)


class Decoder:
    """Turns a key back into argument values: shapes in place of tensors (meta tensors, or real
    integer tensors where values were recorded, for formulas that need tensors)."""

    def __init__(self, key, strings, dtypes, values, as_tensors: bool, tags: Tags) -> None:
        self.key, self.pos, self.t = key, 4, tags
        self.strings, self.dtypes, self.values, self.as_tensors = strings, dtypes, values, as_tensors

    def decode(self):
        key = self.key
        inputs, outputs = [], []
        while self.pos < len(key) and key[self.pos] != self.t.OUTPUTS:
            is_default = bool(key[self.pos])
            self.pos += 1
            inputs.append((is_default, self.value()))
        self.pos += 1
        while self.pos < len(key):
            outputs.append(self.value())
        return inputs, outputs

    def take(self, n: int = 1):
        out = self.key[self.pos:self.pos + n]
        self.pos += n
        return out

    def value(self):
        (tag,) = self.take()
        t = self.t
        if tag == t.TENSOR:
            return self.tensor()
        if tag in (t.NONE, t.OPAQUE):
            return None
        if tag == t.INT:
            return self.take()[0]
        if tag == t.DOUBLE:
            return bits_to_float(self.take()[0])
        if tag == t.SCALAR_NOT_KEPT:  # a float its formula does not read (Formula.reads_scalars)
            return math.nan
        if tag == t.BOOL:
            return bool(self.take()[0])
        if tag == t.STRING:
            return self.strings[self.take()[0]]
        if tag == t.DTYPE:
            return self.dtypes.get(self.take()[0])
        if tag in (t.INT_LIST, t.DOUBLE_LIST, t.BOOL_LIST):
            items = list(self.take(self.take()[0]))
            if tag == t.DOUBLE_LIST:
                return [bits_to_float(v) for v in items]
            return [bool(v) for v in items] if tag == t.BOOL_LIST else items
        if tag == t.LIST:
            return [self.value() for _ in range(self.take()[0])]
        raise ValueError(f"flopcount: corrupt native key (tag {tag})")

    def tensor(self):
        (dim,) = self.take()
        shape = tuple(self.take(dim))
        key, t = self.key, self.t
        data, dtype = None, torch.float32
        # What follows the shape (values, a device copy's slot, the dtype): an op not classified
        # when it ran keeps both values and dtype (csrc/observer.cpp).
        while self.pos < len(key) and key[self.pos] in t.AFTER_TENSOR:
            tag = key[self.pos]
            self.pos += 1
            if tag == t.VALUES:
                data = list(self.take(self.take()[0]))
            elif tag == t.PENDING_VALUES:
                data = self.values[self.take()[0]]
            else:
                dtype = self.dtypes.get(self.take()[0], torch.float32)
        if not self.as_tensors:
            return shape
        if data is not None:
            return torch.tensor(data, dtype=torch.int64).reshape(shape)
        return torch.empty(shape, dtype=dtype, device="meta")


def canonical_arguments(key, t: Tags, keep_dtype: bool, keep_scalars: bool = True) -> tuple:
    """The arguments part of a key (``key[4:]``) as the extension encodes it for an op that needs
    shapes only (and, with ``keep_dtype``, tensor dtypes; without ``keep_scalars``, no float
    scalars: Formula.reads_scalars): an op recorded before it was classified also carries integer
    tensors' values, dtypes and float scalars, which are dropped here, so that its calls share one
    formula evaluation with the later ones."""
    out, n = [], len(key)

    def value(pos: int) -> int:
        tag = key[pos]
        out.append(tag)
        pos += 1
        if tag == t.TENSOR:
            dim = key[pos]
            out.extend(key[pos:pos + 1 + dim])
            pos += 1 + dim
            while pos < n and key[pos] in t.AFTER_TENSOR:
                span = 2 + key[pos + 1] if key[pos] == t.VALUES else 2
                if key[pos] == t.TENSOR_DTYPE and keep_dtype:
                    out.extend(key[pos:pos + span])
                pos += span
            return pos
        if tag in (t.NONE, t.OPAQUE, t.SCALAR_NOT_KEPT):
            return pos
        if tag == t.DOUBLE and not keep_scalars:
            out[-1] = t.SCALAR_NOT_KEPT
            return pos + 1
        if tag in (t.INT, t.DOUBLE, t.BOOL, t.STRING, t.DTYPE):
            out.append(key[pos])
            return pos + 1
        if tag in (t.INT_LIST, t.DOUBLE_LIST, t.BOOL_LIST):
            out.extend(key[pos:pos + 1 + key[pos]])
            return pos + 1 + key[pos]
        if tag == t.LIST:
            count = key[pos]
            out.append(count)
            pos += 1
            for _ in range(count):
                pos = value(pos)
            return pos
        raise ValueError(f"flopcount: corrupt native key (tag {tag})")

    pos = 4
    while pos < n and key[pos] != t.OUTPUTS:
        out.append(key[pos])  # the default flag
        pos = value(pos + 1)
    if pos < n:
        out.append(t.OUTPUTS)
        pos += 1
        while pos < n:
            pos = value(pos)
    return tuple(out)


def bits_to_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def args_kwargs(op, inputs):
    """Split recorded arguments as the Python dispatcher does for __torch_dispatch__: positional
    arguments up to the last one that is not at its default, keyword-only ones not at their default."""
    if op is None:
        return tuple(v for _, v in inputs), {}
    arguments = schema_arguments(op)
    n = min(len(arguments), len(inputs))
    kwarg_start = n
    while kwarg_start > 0 and arguments[kwarg_start - 1][1]:
        kwarg_start -= 1
    positional_end = kwarg_start
    while positional_end > 0 and inputs[positional_end - 1][0]:
        positional_end -= 1
    args = tuple(v for _, v in inputs[:positional_end])
    kwargs = {arguments[i][0]: inputs[i][1] for i in range(kwarg_start, n) if not inputs[i][0]}
    return args, kwargs


@functools.lru_cache(maxsize=4096)
def schema_arguments(op) -> tuple:
    """(name, keyword-only) of an op's arguments: reading ``_schema.arguments`` builds them anew
    each time, which costs more than the rest of a booking."""
    return tuple((a.name, a.kwarg_only) for a in op._schema.arguments)


def overload_of(name: str, overload: str):
    """The OpOverload for 'ns::op' and an overload name ('' is the default overload)."""
    namespace, _, opname = name.partition("::")
    try:
        packet = getattr(getattr(torch.ops, namespace), opname)
        return getattr(packet, overload or "default")
    except (AttributeError, RuntimeError):
        return None


def python_name(name: str) -> str:
    """'aten::mm.out' -> 'aten.mm' (op_name's display form: the packet)."""
    return name.split(".")[0].replace("::", ".")


@functools.lru_cache(maxsize=1)
def _dtype_table(lib) -> tuple:
    codes = {}
    with warnings.catch_warnings():  # creating quantized / complex-half tensors warns
        warnings.simplefilter("ignore")
        for value in vars(torch).values():
            if isinstance(value, torch.dtype) and value not in codes.values():
                try:
                    codes[lib.dtype_code(torch.empty(0, dtype=value))] = value
                except (RuntimeError, TypeError):  # dtypes without CPU storage
                    continue
    return tuple(codes.items())


def dtype_codes(lib) -> dict:
    """Extension's ScalarType code -> torch.dtype."""
    return dict(_dtype_table(lib))
