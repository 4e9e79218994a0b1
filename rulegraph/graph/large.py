"""Models over protobuf's 2 GiB limit: shape inference, serialization and files with external data.

A model is *large* when its initializers hold more than ``LARGE_BYTES`` (a module constant, so that
tests can lower it). onnx's shape inference and ``SerializeToString`` take one protobuf message, which
cannot exceed 2 GiB; for a large model

- ``infer_shapes`` (and ``onnx.checker``, through ``without_weights``) runs on a shell copy whose big
  initializers (over ``INLINE_BYTES``) are graph inputs of the same type and shape: a weight's values
  never decide a shape, small initializers (shape tensors, axes) stay for data propagation (every
  model takes this path: it is also the fast one);
- ``write`` stores the big initializers' bytes in one data file beside the model, one tensor at a time,
  and the model itself as a shell that names each tensor's location, offset and length (ONNX external
  data). The model in memory is left unchanged (``onnx.save`` with external data would clear it).

Held weights: so that a large model's weights are in memory once, its big initializers are numpy
arrays and the ``ModelProto`` holds *stubs* for them (type, shape, and an external-data location
``HELD`` + a key of a process-wide table of weak references to the arrays). Reading a large model
fills the arrays straight from its external-data file (``read_held``); the graph's constants are the
same arrays; copies of a model copy stubs only; a session gets the arrays themselves
(``session_parts``: onnxruntime's ``add_initializer`` over their buffers, no copy); ``write`` and
``serialized`` take the values from the arrays, one tensor at a time. ``value`` is a tensor's array,
held or not.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import weakref
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

#: initializer bytes above which a model takes the large-model path (protobuf's limit is 2 GiB; the
#: explainer compiled from a model is bigger than the model, hence the margin)
LARGE_BYTES = 1 << 30
#: initializers up to this size stay inside the model (shape inference, the saved shell)
INLINE_BYTES = 1 << 10
#: initializer bytes above which a model's big weights are held once, as arrays (``to_hold``): far
#: below the large-model size, so that no model's weights are copied in protobufs (the loaded graph,
#: the compiled explainer, the serialized bytes, the session: a ResNet-18 explainer's process peaked at
#: 13× its 45 MB of weights before, 6× after; benchmarks/compare.py --peak-rss)
HOLD_BYTES = 1 << 20


#: onnxruntime's prepacking in sessions of held weights: on, the answers equal the in-memory path's bit
#: for bit and onnxruntime keeps a packed copy of each MatMul weight; off, the weights are in memory once
PREPACK = True
#: held arrays from this size on are given to sessions by reference (``session_parts``)
SHARE_BYTES = 1 << 20
#: the external-data location prefix of a held stub (no file has it: a session never reads it)
HELD = "*/rulegraph-held/"
#: held key -> the array (weak: the array lives as long as a graph's constants or a model holds it)
_held: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_keys = itertools.count()
#: element types whose bytes are one fixed-size numpy item per element (held weights are of these)
HOLDABLE = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                      onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                      onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                      onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
                      onnx.TensorProto.BOOL})


def _location(tensor: onnx.TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def is_held(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is a stub whose values are a held array."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and _location(tensor).startswith(HELD)


def _array_of(tensor: onnx.TensorProto) -> np.ndarray:
    array = _held.get(_location(tensor)[len(HELD):])
    if array is None:
        from ..errors import InternalError   # noqa: PLC0415 (only on this failure)

        raise InternalError(f"the weights of tensor '{tensor.name}' are no longer in memory (a model kept "
                            "after the Explainer that read it; a bug in rulegraph)")
    return array


#: lists that keep every array held while they are open (``pinned``)
_pins: list[list] = []


@contextlib.contextmanager
def pinned():
    """Keep every array held inside the block alive until its end (a model read in steps holds
    stubs whose arrays nothing else keeps yet); yields the list of them."""
    kept: list = []
    _pins.append(kept)
    try:
        yield kept
    finally:
        _pins.remove(kept)


def hold(array: np.ndarray, name: str) -> onnx.TensorProto:
    """A stub for ``array`` (kept by reference, not copied) named ``name``. The stub does not keep
    the array alive: its owner does (``Graph.constants``, ``Compiled.held``, a ``pinned`` block)."""
    key = str(next(_keys))
    _held[key] = array
    for kept in _pins:
        kept.append(array)
    stub = onnx.TensorProto()
    stub.name = name
    stub.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    stub.dims.extend(array.shape)
    stub.data_location = onnx.TensorProto.EXTERNAL
    entry = stub.external_data.add()
    entry.key, entry.value = "location", HELD + key
    return stub


def holdable(array: np.ndarray) -> bool:
    """Big enough to hold, of a type whose bytes are its items', in C order."""
    return (array.nbytes > INLINE_BYTES and array.dtype.kind in "fiub" and array.flags.c_contiguous
            and onnx.helper.np_dtype_to_tensor_dtype(array.dtype) in HOLDABLE)


def initializer(array: np.ndarray, name: str, held: bool) -> onnx.TensorProto:
    """``array`` as an initializer: a stub when ``held`` and it is big, else the tensor with its values."""
    array = np.asarray(array)
    if held and holdable(array):
        return hold(array, name)
    return numpy_helper.from_array(array, name)


def value(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values (a held stub's array itself, not a copy)."""
    return _array_of(tensor) if is_held(tensor) else numpy_helper.to_array(tensor)


def hold_big(proto: onnx.ModelProto) -> None:
    """Turn every big initializer of the top graph with values into a held stub, one at a time (the
    array is the only copy once its tensor is replaced)."""
    graph = proto.graph
    for i, tensor in enumerate(graph.initializer):
        if is_held(tensor) or tensor.data_location == onnx.TensorProto.EXTERNAL or not _big(tensor) \
                or tensor.data_type not in HOLDABLE:
            continue
        array = numpy_helper.to_array(tensor)
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        graph.initializer[i].CopyFrom(hold(array, tensor.name))


def holds(proto: onnx.ModelProto) -> bool:
    """Whether any initializer of the top graph is a held stub."""
    return any(is_held(t) for t in proto.graph.initializer)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes of a tensor: from its type and shape for external data (held or in a file), else its
    size in the protobuf."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.data_type in HOLDABLE:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return tensor.ByteSize()


def initializer_bytes(proto: onnx.ModelProto) -> int:
    """Bytes the top graph's initializers take (in the protobuf, or held / external by their shape)."""
    return sum(_tensor_bytes(t) for t in proto.graph.initializer)


def is_large(proto: onnx.ModelProto) -> bool:
    return initializer_bytes(proto) > LARGE_BYTES


def to_hold(proto: onnx.ModelProto) -> bool:
    """Whether a model read holds its big weights as arrays: over ``HOLD_BYTES`` of weights (or
    ``LARGE_BYTES``, where that is lower), or already holding some."""
    return holds(proto) or initializer_bytes(proto) > min(HOLD_BYTES, LARGE_BYTES)


def _copy_fields(source, target, skip: str) -> None:
    """Every set field of ``source`` but ``skip`` into the empty message ``target``."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, Message):
            getattr(target, field.name).CopyFrom(value)
        elif hasattr(value, "extend"):   # a repeated field
            getattr(target, field.name).extend(value)
        else:
            setattr(target, field.name, value)


def _shell(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` without the top graph's initializers (everything else copied)."""
    shell = onnx.ModelProto()
    _copy_fields(proto, shell, "graph")
    _copy_fields(proto.graph, shell.graph, "initializer")
    return shell


def _big(tensor: onnx.TensorProto) -> bool:
    """Held, or more than ``INLINE_BYTES`` of values from the dims and element size (asking protobuf for
    the message's size walks it); strings, whose size is in their bytes, by the message's size."""
    if is_held(tensor):
        return True
    if tensor.data_type == onnx.TensorProto.STRING:
        return tensor.ByteSize() > INLINE_BYTES
    count = 1
    for d in tensor.dims:
        count *= d
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return count * itemsize > INLINE_BYTES


def without_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A shell of ``proto`` whose big initializers are graph inputs of their type and shape (what shape
    inference and ``onnx.checker`` need of a weight). Done for every model, not only large or held
    ones: shape inference and the checker serialize the model they get, and a weight's bytes would
    otherwise be copied in and out of protobuf at each call (seconds for a BERT-base)."""
    shell = _shell(proto)
    declared = {i.name for i in shell.graph.input}
    for tensor in proto.graph.initializer:
        if not _big(tensor):
            shell.graph.initializer.append(tensor)
        elif tensor.name not in declared:
            shell.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                        list(tensor.dims)))
    return shell


def infer_shapes(proto: onnx.ModelProto, **options) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes(proto, **options)``, on ``without_weights(proto)`` (for a
    large model the result lists the big initializers as inputs and holds none of them)."""
    return onnx.shape_inference.infer_shapes(without_weights(proto), **options)


def serialized(proto: onnx.ModelProto):
    """``proto``'s deterministic serialization in pieces each under 2 GiB (for a digest): the whole
    model when it is not large, else the shell then each initializer."""
    if not is_large(proto):   # held weights: the bytes the model with its values would have
        yield inline(proto).SerializeToString(deterministic=True)
        return
    yield _shell(proto).SerializeToString(deterministic=True)
    for tensor in proto.graph.initializer:   # a held stub as the tensor with its values would be
        full = numpy_helper.from_array(_array_of(tensor), tensor.name) if is_held(tensor) else tensor
        yield full.SerializeToString(deterministic=True)


def _raw(tensor: onnx.TensorProto):
    """The tensor's values as little-endian raw bytes (``raw_data``, or the typed fields converted; a
    held array's own buffer)."""
    if is_held(tensor):
        return memoryview(_array_of(tensor).reshape(-1).view(np.uint8))
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    values = numpy_helper.to_array(tensor)
    return values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()


def write(proto: onnx.ModelProto, path: str | os.PathLike, data_path: str | os.PathLike | None = None,
          location: str | None = None) -> None:
    """Write ``proto`` to ``path`` with every big initializer of its top graph in one data file
    (``data_path``, default beside ``path``; ``location``: the name the model records for it, default
    the data file's name). ``proto`` itself is unchanged; each tensor's bytes are copied once, while
    written."""
    path = Path(path)
    data_path = Path(data_path) if data_path is not None else path.with_name(path.name + ".data")
    shell = _shell(proto)
    offset = 0
    with open(data_path, "wb") as data:
        for tensor in proto.graph.initializer:
            if not _big(tensor):
                shell.graph.initializer.append(tensor)
                continue
            raw = _raw(tensor)
            data.write(raw)
            length = len(raw)
            del raw
            stub = shell.graph.initializer.add()
            stub.name = tensor.name
            stub.data_type = tensor.data_type
            stub.dims.extend(tensor.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location or data_path.name), ("offset", str(offset)),
                               ("length", str(length))):
                entry = stub.external_data.add()
                entry.key, entry.value = key, value
            offset += length
        data.flush()
        os.fsync(data.fileno())
    Path(path).write_bytes(shell.SerializeToString())


def read_held(proto: onnx.ModelProto, folder: Path) -> None:
    """Each initializer of the top graph stored in an external-data file (checked beforehand) read
    straight into an array and replaced by a held stub: no protobuf copy of the values is made."""
    graph = proto.graph
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_location != onnx.TensorProto.EXTERNAL or is_held(tensor) \
                or tensor.data_type not in HOLDABLE:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        count = int(np.prod(tensor.dims, dtype=np.int64))
        array = np.fromfile(folder / entries["location"], dtype=dtype, count=count,
                            offset=int(entries.get("offset") or 0)).reshape(tuple(tensor.dims))
        graph.initializer[i].CopyFrom(hold(array, tensor.name))


#: op types whose weight input onnxruntime's graph optimizers leave as it is (they may read, fold or
#: reorder the weights of others, Conv's for one, which they cannot do to a shared initializer)
SHAREABLE_CONSUMERS = frozenset({"MatMul", "Gemm", "Gather"})


def session_parts(proto: onnx.ModelProto, folder: Path,
                  share: bool = True) -> tuple[Path, dict[str, np.ndarray]]:
    """For a session of a model with held stubs: the model written to ``folder`` and the held arrays
    to give the session by reference (``add_initializer``: their buffers, not copies), by name.
    Shared: the held arrays from ``SHARE_BYTES`` on that only ``SHAREABLE_CONSUMERS`` read (``share``:
    any); their stubs name an external-data file that onnxruntime checks exists and never reads. The
    other held arrays are written to that file, one at a time, for onnxruntime to read."""
    shell = onnx.ModelProto()
    shell.CopyFrom(proto)
    consumers: dict[str, set[str]] = {}
    graphs = [shell.graph]
    while graphs:   # subgraphs (a loop model's body) read the outer weights too
        for node in graphs.pop().node:
            for name in node.input:
                consumers.setdefault(name, set()).add(node.op_type)
            for attr in node.attribute:
                graphs.extend(([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
    arrays, offset = {}, 0
    data = folder / "weights.data"
    with open(data, "wb") as out:
        for tensor in shell.graph.initializer:
            if not is_held(tensor):
                continue
            array = _array_of(tensor)
            del tensor.external_data[:]
            entries = [("location", data.name)]
            readers = consumers.get(tensor.name, {"?"})
            if share and array.nbytes >= SHARE_BYTES and readers <= SHAREABLE_CONSUMERS:
                arrays[tensor.name] = array
            else:
                out.write(memoryview(array.reshape(-1).view(np.uint8)))
                entries += [("offset", str(offset)), ("length", str(array.nbytes))]
                offset += array.nbytes
            for key, text in entries:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, text
    path = folder / "model.onnx"
    path.write_bytes(shell.SerializeToString())
    return path, arrays


def inline(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` itself when it holds no stubs, else a copy with each held stub's values in it."""
    if not holds(proto):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for i, tensor in enumerate(copy.graph.initializer):
        if is_held(tensor):
            copy.graph.initializer[i].CopyFrom(numpy_helper.from_array(_array_of(tensor), tensor.name))
    return copy


def write_whole(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``proto`` as one ONNX file with its held values inside, without a whole copy in memory:
    the model without the held initializers, then one ``ModelProto`` per held tensor holding only
    ``graph.initializer`` (protobuf merges a message field that occurs twice, so the file reads as the
    one model; each tensor is copied once, while written)."""
    shell = onnx.ModelProto()
    shell.CopyFrom(proto)
    held = [t for t in shell.graph.initializer if is_held(t)]
    kept = [t for t in shell.graph.initializer if not is_held(t)]
    arrays = [(t.name, _array_of(t)) for t in held]
    del shell.graph.initializer[:]
    shell.graph.initializer.extend(kept)
    with open(path, "wb") as out:
        out.write(shell.SerializeToString())
        for name, array in arrays:
            piece = onnx.ModelProto()
            piece.graph.initializer.append(numpy_helper.from_array(array, name))
            out.write(piece.SerializeToString())
            del piece
