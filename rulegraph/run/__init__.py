"""Stage 5, running: sessions, results, baselines, inputs and files, loops, the Explainer.

Imports the stages below it.
"""
