"""Stage 1, the model: ONNX -> Graph (read, check, fold constants, fuse patterns, op kinds).

Knows nothing of rules; imports only ``rulegraph.errors``.
"""
