"""rulegraph: declarative rule-graph attribution for ONNX models.

A rule file assigns a backward rule to each op type; rulegraph checks it against the model and
compiles model + rules into one ONNX model computing the forward and the relevance pass together.
"""

from .backward.ops import load
from .compile.targets import Target, TargetError
from .errors import CoverageError, ModelError, RulegraphError, RuleSyntaxError
from .graph import Graph
from .lang.ruleset import RuleSet
from .run.cam import Cam, cam, crp
from .run.evaluate import Evaluation, evaluate
from .run.explainer import Explainer, Result
from .run.featviz import visualize
from .run.preprocess import Preprocess, preprocess
from .run.representation import represent, unit_grid
from .run.units import top_examples
from .run.windows import UnitWindows, unit_windows

__all__ = ["Cam", "CoverageError", "Evaluation", "Explainer", "Graph", "ModelError", "Preprocess", "Result",
           "RuleSet", "RuleSyntaxError", "RulegraphError", "Target", "TargetError", "UnitWindows", "cam", "crp",
           "evaluate", "load", "preprocess", "represent", "top_examples", "unit_grid", "unit_windows", "visualize"]
__version__ = "0.1.0"
