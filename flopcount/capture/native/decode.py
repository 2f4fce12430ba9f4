"""Decoding the native extension's keys (csrc/): a key back into the op and its argument values.

A key is the op id, the context (snapshot) id, flags, the backward module, then each argument
(a default flag and a tagged value) and, after ``OUTPUTS``, the output values. The tags are those
of csrc/flopcount_native.cpp. Tensors decode to their shapes (or meta tensors, or integer tensors
where the values were recorded, for formulas that read tensors); NativeCapture (capture.py) books
what decodes through the one formula registry.
"""
from __future__ import annotations

import functools
import struct
import warnings

import torch

# Key tags, as in csrc/flopcount_native.cpp.
(NONE, TENSOR, INT, DOUBLE, BOOL, STRING, INT_LIST, DOUBLE_LIST, BOOL_LIST, LIST, DTYPE, OPAQUE,
 VALUES, PENDING_VALUES, TENSOR_DTYPE) = range(15)
OUTPUTS = -1


class Decoder:
    """Turns a key back into argument values: shapes in place of tensors (meta tensors, or real
    integer tensors where values were recorded, for formulas that need tensors)."""

    def __init__(self, key, strings, dtypes, values, as_tensors: bool) -> None:
        self.key, self.pos = key, 4
        self.strings, self.dtypes, self.values, self.as_tensors = strings, dtypes, values, as_tensors

    def decode(self):
        key = self.key
        inputs, outputs = [], []
        while self.pos < len(key) and key[self.pos] != OUTPUTS:
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
        if tag == TENSOR:
            return self.tensor()
        if tag in (NONE, OPAQUE):
            return None
        if tag == INT:
            return self.take()[0]
        if tag == DOUBLE:
            return bits_to_float(self.take()[0])
        if tag == BOOL:
            return bool(self.take()[0])
        if tag == STRING:
            return self.strings[self.take()[0]]
        if tag == DTYPE:
            return self.dtypes.get(self.take()[0])
        if tag in (INT_LIST, DOUBLE_LIST, BOOL_LIST):
            items = list(self.take(self.take()[0]))
            if tag == DOUBLE_LIST:
                return [bits_to_float(v) for v in items]
            return [bool(v) for v in items] if tag == BOOL_LIST else items
        if tag == LIST:
            return [self.value() for _ in range(self.take()[0])]
        raise ValueError(f"flopcount: corrupt native key (tag {tag})")

    def tensor(self):
        (dim,) = self.take()
        shape = tuple(self.take(dim))
        key = self.key
        data, dtype = None, torch.float32
        if self.pos < len(key) and key[self.pos] == VALUES:
            self.pos += 1
            data = list(self.take(self.take()[0]))
        elif self.pos < len(key) and key[self.pos] == PENDING_VALUES:
            self.pos += 1
            data = self.values[self.take()[0]]
        elif self.pos < len(key) and key[self.pos] == TENSOR_DTYPE:
            self.pos += 1
            dtype = self.dtypes.get(self.take()[0], torch.float32)
        if not self.as_tensors:
            return shape
        if data is not None:
            return torch.tensor(data, dtype=torch.int64).reshape(shape)
        return torch.empty(shape, dtype=dtype, device="meta")


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
