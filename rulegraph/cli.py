"""``rulegraph explain | check | compile | lint | ops | demo``.

Exit codes: 0 success, 1 a checked property does not hold (``check``; a node without a rule in
``ops``), 2 bad input (unreadable model, rule file error, bad arguments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .errors import RulegraphError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def bundled_models_dir() -> Path:
    """Where the example models live: the repository's models/ or the installed package data."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "models", here / "bundled_models"):
        if (candidate / "digits_cnn.onnx").is_file():
            return candidate
    raise RulegraphError("the bundled example models are missing from this installation")


def load_input(path: str, explainer, scale: float = 1.0):
    """Model input from .npy, .npz (arrays named like the model's inputs, or one array) or an image."""
    p = Path(path)
    if not p.is_file():
        raise RulegraphError(f"{path}: no such input file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return np.load(p)
    if suffix == ".npz":
        with np.load(p) as data:
            arrays = {k: data[k] for k in data.files}
        names = explainer.graph.inputs
        if set(names) <= set(arrays):
            return {n: arrays[n] for n in names}
        if len(arrays) == 1 or "x" in arrays:
            return arrays.get("x", next(iter(arrays.values())))
        raise RulegraphError(f"{path}: holds {sorted(arrays)}; expected arrays named {names} or one array 'x'")
    if suffix in IMAGE_SUFFIXES:
        from .viz import load_image

        name = explainer.graph.inputs[0]
        shape = explainer.graph.shapes.get(name)
        if shape is None or len(shape) != 4:
            raise RulegraphError(f"{path}: an image needs a model input of shape [N, C, H, W]; "
                                 f"'{name}' has {shape}")
        return load_image(p, shape, scale)
    raise RulegraphError(f"{path}: unknown input format '{suffix}' (use .npy, .npz or an image)")


def _parse_target(text: str):
    if text == "argmax":
        return "argmax"
    if text.endswith(".npy"):
        return _load_array(text, "--target")
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise RulegraphError(f"--target must be 'argmax', class indices like 3 or 3,5, or a seed .npy "
                             f"file; got '{text}'") from None


def _load_array(path: str, option: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RulegraphError(f"{option} {path}: cannot read the .npy file: {exc}") from None


def _ints(text: str, option: str, example: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise RulegraphError(f"{option} must be integers like {example}; got '{text}'") from None


def _slices(text: str) -> tuple[slice, ...]:
    """``10:20,30:40`` -> (slice(10, 20), slice(30, 40)); an empty bound is open."""
    out = []
    for part in text.split(","):
        bounds = part.split(":")
        try:
            if len(bounds) != 2:
                raise ValueError
            out.append(slice(*(int(b) if b.strip() else None for b in bounds)))
        except ValueError:
            raise RulegraphError(f"--region must be one start:stop per position axis, like 10:20,30:40; "
                                 f"got '{text}'") from None
    return tuple(out)


def target_of(args):
    """The target the explain options describe (``targets.Target``, or a seed array / class list)."""
    from .targets import Target

    cls = _parse_target(args.target)
    forms = {"at": tuple(_ints(args.at, "--at", "20 or 5,7")) if args.at else None,
             "region": _slices(args.region) if args.region else None,
             "mask": _load_array(args.mask, "--mask") if args.mask else None,
             "all_positions": args.all_positions,
             "versus": _ints(args.versus, "--versus", "5")[0] if args.versus else None}
    if isinstance(cls, np.ndarray) and cls.dtype.kind == "f":
        if any(v is not None and v is not False for v in forms.values()):
            raise RulegraphError("a seed array (--target seed.npy) says everything itself: drop --at, --region, "
                                 "--mask, --all-positions and --versus")
        return cls
    if forms["at"] is not None and len(forms["at"]) == 1:
        forms["at"] = forms["at"][0]
    return Target(cls, **forms)


def summary(result) -> str:
    """The per-row lines printed after an explain run: class, start value, sums and delta."""
    lines = []
    for i in range(len(result.start_value)):
        attr = sum(float(a[i].sum()) for a in result.attribution.values())
        bias = float(result.bias_total[i]) if result.bias_total is not None else 0.0
        target = "" if result.target is None else _explained(result, i)
        lines.append(f"row {i}: {target}start {result.start_value[i]:.6g}, attribution {attr:.6g}, "
                     f"bias {bias:.6g}, conservation delta {result.delta[i]:.3g} "
                     f"({abs(result.relative_delta[i]):.2e} relative)")
    return "\n".join(lines)


def _explained(result, i: int) -> str:
    """``class 6 of 'logits' [N, T, 6625] (class axis 2) at t=20: `` (``minus class 5`` when contrastive)."""
    versus = "" if result.versus is None else f" minus class {int(result.versus[i])}"
    where = f" {result.where}" if result.where else ""
    return f"class {int(result.target[i])}{versus} of {result.explained}{where}: "


def cmd_explain(args) -> int:
    from .explainer import Explainer

    explainer = Explainer(args.model, args.rules, output=args.output, start=args.start, class_axis=args.class_axis)
    x = load_input(args.input, explainer, args.scale)
    result = explainer.explain(x, target=target_of(args))
    print(summary(result))
    if args.out:
        np.save(args.out, result.map)
        print(f"attribution written to {args.out}")
    if args.heatmap:
        from .viz import save_heatmap

        save_heatmap(result.map[0], args.heatmap)
        print(f"heatmap written to {args.heatmap}")
    return 0


def cmd_compile(args) -> int:
    from .explainer import Explainer

    explainer = Explainer(args.model, args.rules, output=args.output, start=args.start, class_axis=args.class_axis)
    path = explainer.save(args.o)
    compiled = explainer.compiled()
    print(f"explainer written to {path}: inputs {compiled.input_names}, attribution outputs "
          f"{list(compiled.attribution.values())}")
    return 0


def cmd_check(args) -> int:
    from .check import check
    from .explainer import Explainer

    x = None
    if args.input:
        x = load_input(args.input, Explainer(args.model, args.rules), args.scale)
    samples = 0 if x is not None else args.samples
    report = check(args.model, args.rules, x=x, samples=samples, tolerance=args.tolerance,
                   probes=args.probes, output=args.output, start=args.start)
    text = {"text": report.to_text, "json": report.to_json, "junit": report.to_junit}[args.format]()
    if args.output_file:
        Path(args.output_file).write_text(text if text.endswith("\n") else text + "\n")
        print(f"report written to {args.output_file}: {'OK' if report.ok else 'FAILED'}")
    else:
        print(text)
    return 0 if report.ok else 1


def cmd_lint(args) -> int:
    from . import dsl

    ruleset = dsl.load(args.rules)
    print(f"{args.rules}: ok ({len(ruleset.bindings)} bindings, quantity {ruleset.quantity}, bias {ruleset.bias})")
    return 0


def cmd_ops(args) -> int:
    from . import dsl
    from .compile import assign, find_start, path_nodes
    from .graph import load

    graph = load(args.model)
    ruleset = dsl.load(args.rules)
    start = find_start(graph, ruleset, args.output, args.start)
    rows = assign(graph, ruleset, path_nodes(graph, start))
    width = max([len(r.node.name) for r in rows] + [4])
    # a fused node (fusion.py) names the nodes it stands for: "Gelu [fused: /mlp/Div, /mlp/Erf, ...]"
    op_types = {r.node.name: r.node.op_type + (f" [fused: {', '.join(m.name for m in r.node.members)}]"
                                               if r.node.members else "") for r in rows}
    op_width = max([len(t) for t in op_types.values()] + [20])
    print(f"{'node':<{width}}  {'op type':<{op_width}} {'kind':<12} rule")
    missing = 0
    for r in rows:
        if r.problem:
            missing += 1
            rule = "!! " + r.problem
        else:
            rule = f"{r.binding.rule}    ({r.binding.selector} at {r.binding.location})"
        print(f"{r.node.name:<{width}}  {op_types[r.node.name]:<{op_width}} {r.node.kind or '?':<12} {rule}")
    print(f"{len(rows)} nodes on the relevance path (start: '{start}'); {missing} without a usable rule")
    return 1 if missing else 0


def cmd_demo(args) -> int:
    from .explainer import Explainer

    models = bundled_models_dir()
    model, image = models / "digits_cnn.onnx", models / "digit_3.png"
    explainer = Explainer(model, args.rules)
    x = load_input(str(image), explainer)
    result = explainer.explain(x)
    logits = next(iter(result.outputs.values()))[0]
    print(f"model: {model.name} (bundled digits CNN), input: {image.name}, rules: {args.rules}")
    print(f"predicted class: {int(np.argmax(logits))} (logit {logits.max():.3f}) on {result.device}")
    print(summary(result))
    from .viz import save_heatmap

    save_heatmap(result.map[0], args.heatmap)
    print(f"heatmap written to {args.heatmap}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rulegraph", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def model_and_rules(p):
        p.add_argument("model", help="the ONNX model file")
        p.add_argument("--rules", required=True, help="a rule file, or a bundled one's name (lrp-epsilon)")
        p.add_argument("--output", help="the model output to explain (default: the first)")
        p.add_argument("--start", help="start at this intermediate tensor instead")

    p = sub.add_parser("explain", help="attribute one input batch")
    model_and_rules(p)
    p.add_argument("--input", required=True, help=".npy, .npz or an image file")
    p.add_argument("--target", default="argmax", help="argmax, class indices (3 or 3,5), or a seed .npy")
    p.add_argument("--at", help="for outputs with position axes: the class at this position (20, or 5,7)")
    p.add_argument("--region", help="the class summed over a region, a start:stop per position axis (10:20,30:40)")
    p.add_argument("--mask", help="the class summed over positions weighted by this .npy mask")
    p.add_argument("--all-positions", action="store_true", help="the class summed over all positions")
    p.add_argument("--versus", help="contrastive: minus this class's logit (at the same positions)")
    p.add_argument("--class-axis", type=int, help="the start tensor's class axis (default: the final "
                   "Softmax's axis, else 1 for [N, C] and [N, C, H, W], 2 for [N, T, C])")
    p.add_argument("--scale", type=float, default=1.0, help="images are read as values in [0, scale]")
    p.add_argument("--out", help="write the attribution of the first input here (.npy)")
    p.add_argument("--heatmap", help="write a heatmap of the first row here (.png)")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("compile", help="write the explainer ONNX model (forward + relevance pass)")
    model_and_rules(p)
    p.add_argument("-o", required=True, help="where to write the explainer .onnx")
    p.add_argument("--class-axis", type=int, help="the start tensor's class axis (see explain)")
    p.set_defaults(run=cmd_compile)

    p = sub.add_parser("check", help="coverage, conservation and consistency of a rule file on a model (CI)")
    model_and_rules(p)
    p.add_argument("--input", help="measure conservation on this input (.npy, .npz, image)")
    p.add_argument("--samples", type=int, default=4, help="else on N seeded random inputs (0: static only)")
    p.add_argument("--scale", type=float, default=1.0, help="images are read as values in [0, scale]")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest leak allowed, relative to the start value")
    p.add_argument("--probes", action="store_true", help="also run the consistency probes")
    p.add_argument("--format", choices=["text", "json", "junit"], default="text")
    p.add_argument("--output-file", help="write the report here instead of standard output")
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("lint", help="check a rule file on its own")
    p.add_argument("rules")
    p.set_defaults(run=cmd_lint)

    p = sub.add_parser("ops", help="which node gets which rule")
    model_and_rules(p)
    p.set_defaults(run=cmd_ops)

    p = sub.add_parser("demo", help="explain a bundled digit with a bundled model; write a heatmap")
    p.add_argument("--rules", default="lrp-epsilon")
    p.add_argument("--heatmap", default="rulegraph-demo.png")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RulegraphError as exc:
        print(f"rulegraph {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
