"""Stage 3, the backward: the ONNX builder (``emit.Tape``), each op's VJP and kind, the rule table
and its families (LRP, DeepLIFT, transformer, guided, unsupported), the reverse interpreter.

Imports ``graph``, ``lang`` and ``errors``.
"""
