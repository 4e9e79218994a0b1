"""Stage 4, the compiler: model + RuleSet -> one ONNX explainer (plan, rule context, build, assembly).

Imports the stages below it (``backward``, ``lang``, ``graph``, ``errors``).
"""
