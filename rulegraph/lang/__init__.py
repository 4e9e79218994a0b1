"""Stage 2, the rule language: rule-file text -> RuleSet.

Gets its catalog of rules, loops and op kinds as a parameter (``lang.catalog.Catalog``); knows
nothing of ONNX. Imports only ``rulegraph.errors``.
"""
