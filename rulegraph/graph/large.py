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
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

#: initializer bytes above which a model takes the large-model path (protobuf's limit is 2 GiB; the
#: explainer compiled from a model is bigger than the model, hence the margin)
LARGE_BYTES = 1 << 30
#: initializers up to this size stay inside the model (shape inference, the saved shell)
INLINE_BYTES = 1 << 10


def initializer_bytes(proto: onnx.ModelProto) -> int:
    """Bytes the top graph's initializers take in the protobuf (each one under 2 GiB, so each size is exact)."""
    return sum(t.ByteSize() for t in proto.graph.initializer)


def is_large(proto: onnx.ModelProto) -> bool:
    return initializer_bytes(proto) > LARGE_BYTES


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
    """More than ``INLINE_BYTES`` of values, from the dims and element size (asking protobuf for the
    message's size walks it); strings, whose size is in their bytes, by the message's size."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return tensor.ByteSize() > INLINE_BYTES
    count = 1
    for d in tensor.dims:
        count *= d
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return count * itemsize > INLINE_BYTES


def without_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A shell of ``proto`` whose big initializers are graph inputs of their type and shape (what shape
    inference and ``onnx.checker`` need of a weight). Done for every model, not only large ones:
    shape inference and the checker serialize the model they get, and a weight's bytes would
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
    if not is_large(proto):
        yield proto.SerializeToString(deterministic=True)
        return
    yield _shell(proto).SerializeToString(deterministic=True)
    for tensor in proto.graph.initializer:
        yield tensor.SerializeToString(deterministic=True)


def _raw(tensor: onnx.TensorProto) -> bytes:
    """The tensor's values as little-endian raw bytes (``raw_data``, or the typed fields converted)."""
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
            stub = shell.graph.initializer.add()
            stub.name = tensor.name
            stub.data_type = tensor.data_type
            stub.dims.extend(tensor.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location or data_path.name), ("offset", str(offset)),
                               ("length", str(len(raw)))):
                entry = stub.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
        data.flush()
        os.fsync(data.fileno())
    Path(path).write_bytes(shell.SerializeToString())
