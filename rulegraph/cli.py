"""``rulegraph explain | compare | show | evaluate | check | compile | lint | ops | demo``.

Exit codes: 0 success; 1 a checked property does not hold (``check``; a node without a rule in
``ops``); 2 bad input (unreadable model, input or rule file, bad arguments, an output path that
cannot be written); 3 an internal error, a bug in rulegraph (one line; ``RULEGRAPH_DEBUG=1`` shows
the traceback); 130 interrupted (Ctrl-C); 141 standard output closed early (``| head``), quietly.
Warnings print as one line ``rulegraph CMD: warning: ...`` on standard error. Every output file is
written atomically (``files.py``) and may not be one of the command's inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from . import viz
from .backward.ops import load
from .check.checks import check
from .check.measured import sample_inputs
from .compile.cam import METHODS as CAM_METHODS
from .compile.form import FORMS
from .compile.plan import HELD, assign, find_start, path_nodes
from .compile.summary import summarize
from .compile.targets import Target
from .compile.unmatched import warn_unmatched
from .errors import RulegraphError, RulegraphWarning
from .run import preprocess as pre
from .run import rulefiles as dsl
from .run.amplification import DEFAULT_MAX_AMPLIFICATION
from .run.cam import Cam
from .run.dataset import is_dataset_path
from .run.explainer import Explainer
from .run.files import check_output, model_files, rule_files, write_bytes, write_with
from .run.kernels import cuda_fallbacks
from .run.inputs import IMAGE_SUFFIXES, load_input, read_npy  # noqa: F401  (load_input: the API's input reader)
from .run.shards import FORMATS, MAX_SHARD_SIZE
from .viz import (
    DEFAULT_CLIP,
    FIGURE_SUFFIXES,
    MODES,
    REDUCTIONS,
    SIGNS,
    choose_maps,
    display_image,
    figure,
    heatmap_suffixes,
    is_image,
    method_name,
    read_labels,
    render,
    row_panels,
    save_figure,
    show_defaults,
    title_of,
)

EXIT_OK, EXIT_VIOLATED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141  # 128 + SIGINT, 128 + SIGPIPE


def bundled_models_dir() -> Path:
    """Where the example models live: the repository's models/ or the installed package data."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "models", here / "bundled_models"):
        if (candidate / "digits_cnn.onnx").is_file():
            return candidate
    raise RulegraphError("the bundled example models are missing from this installation")


def _parse_target(text: str):
    if text == "argmax":
        return "argmax"
    if text.endswith(".npy"):
        if not Path(text).is_file():
            raise RulegraphError(f"--target {text}: no such seed file")
        return read_npy(text)
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


def _inputs_of(args) -> list[Path]:
    """The files a command reads (model, its external data, rule file, input): no output may be one."""
    outputs = [getattr(args, name, None) for name in ("out", "heatmap", "o", "output_file", "layer_out")]
    files = model_files(getattr(args, "model", None), outputs) + rule_files(getattr(args, "rules", None))
    for name in ("input", "target"):
        value = getattr(args, name, None)
        if value and Path(value).is_file():
            files.append(Path(value))
    return files


def _explained(result, i: int) -> str:
    """``class 6 of 'logits' [N, T, 6625] (class axis 2) at t=20: `` (``minus class 5`` when contrastive)."""
    versus = "" if result.versus is None else f" minus class {int(result.versus[i])}"
    where = f" {result.where}" if result.where else ""
    return f"class {int(result.target[i])}{versus} of {result.explained}{where}: "


def _cam_or_rules(args) -> None:
    """``--rules`` or ``--method`` (a CAM, on the gradient), not both, not neither."""
    if args.method and args.rules:
        raise RulegraphError(f"--method {args.method} computes its map from the gradient pass: drop --rules "
                             f"{args.rules}, or drop --method to explain with the rule file")
    if not args.method and not args.rules:
        raise RulegraphError(f"--rules is required (a rule file or a bundled name such as lrp-epsilon), or "
                             f"--method for a CAM ({', '.join(CAM_METHODS)})")


def cmd_cam(args, sources) -> int:
    """``explain --method M [--layer NAME]``: the CAM per row, as ``--out`` and a picture."""
    cam = Cam(args.model, args.method, args.layer, output=args.output, start=args.start,
              class_axis=args.class_axis)
    x = load_input(args.input, cam.explainer, args.scale or 1.0, args.allow_nonfinite,
                   preprocess=preprocess_of(args))
    result = cam.explain(x, target=target_of(args))
    maps = result.guided if result.guided is not None else result.map
    for i, c in enumerate(result.target):
        print(f"row {i}: {args.method} at '{result.layer}' for class {int(c)}")
    if args.out:
        write_with(args.out, lambda tmp: np.save(tmp, maps), "--out")
        print(f"{args.method} map written to {args.out}")
    if args.heatmap:
        labels = read_labels(args.labels) if args.labels else None
        xs = _first_array(x)
        images = [display_image(xs[i], args.bgr) for i in range(len(maps))]
        titles = [title_of(int(c), labels, f"{args.method} at {result.layer}", None) for c in result.target]
        sign = args.sign or ("all" if result.guided is not None else "positive")
        viz.render_array(maps, images, args.mode, sign, args.clip, args.reduce or "sum", args.background, titles,
                         path=args.heatmap, inputs=sources)
        print(f"heatmap written to {args.heatmap}")
    return 0


def _layer_summary(result, layer: str) -> str:
    """``row i: Σ attribution at 'T' ...`` per row (``explain --layer`` with a rule file)."""
    values = result.at[layer]
    return "\n".join(f"row {i}: attribution at '{layer}' {list(values.shape[1:])}: sum {float(v.sum()):.6g}"
                     for i, v in enumerate(values))


def cmd_explain(args) -> int:
    _cam_or_rules(args)
    if args.form != "standard" and (args.method or args.ray):
        raise RulegraphError(f"--form {args.form} compiles a rule file for one process: drop it with "
                             f"{'--method' if args.method else '--ray'}")
    if args.o or is_dataset_path(args.input):
        if args.method:
            raise RulegraphError(f"--method {args.method} explains one input at a time; a dataset run (-o, or a "
                                 f"folder, glob or .parquet input) takes --rules")
        return cmd_explain_dataset(args)
    sources = _inputs_of(args)
    if args.out:
        check_output(args.out, sources, [".npy"], "--out")
    if args.heatmap:
        html = Path(args.heatmap).suffix.lower() == ".html"  # token relevance; else a picture
        check_output(args.heatmap, sources, [".html"] if html else heatmap_suffixes(), "--heatmap")
    if args.layer_out:
        check_output(args.layer_out, sources, [".npy"], "--layer-out")
        if not args.layer:
            raise RulegraphError("--layer-out writes the attribution at --layer NAME: give --layer")
    if args.method:
        return cmd_cam(args, sources)
    spec = preprocess_of(args)
    explainer = Explainer(args.model, args.rules, output=args.output, start=args.start,
                          class_axis=args.class_axis, form=args.form)
    explainer.allow_nonfinite = args.allow_nonfinite
    labels = None
    if args.heatmap and args.labels:

        labels = read_labels(args.labels)
    x = load_input(args.input, explainer, args.scale or 1.0, args.allow_nonfinite, preprocess=spec)
    result = explainer.explain(x, target=target_of(args), max_amplification=args.max_amplification,
                               at=[args.layer] if args.layer else None)
    print(summary(result))
    if args.layer:
        layer = next(iter(result.at))
        print(_layer_summary(result, layer))
        if args.layer_out:
            write_with(args.layer_out, lambda tmp: np.save(tmp, result.at[layer]), "--layer-out")
            print(f"attribution at '{layer}' written to {args.layer_out}")
    if args.out:
        write_with(args.out, lambda tmp: np.save(tmp, result.map), "--out")
        print(f"attribution written to {args.out}")
    if args.heatmap and Path(args.heatmap).suffix.lower() == ".html":
        _token_page(args, result, x, labels)
        print(f"token relevance written to {args.heatmap}")
    elif args.heatmap:

        render(result, x=_first_array(x), labels=labels, method=method_name(args.rules), path=args.heatmap,
               inputs=sources, **_picture_kwargs(args))
        print(f"heatmap written to {args.heatmap}")
    return 0


def _memory(text: str) -> int:
    """``512M``, ``2G``, ``1.5G`` or a number of bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    body = text.strip().upper().removesuffix("B")
    try:
        value = float(body[:-1]) * units[body[-1]] if body and body[-1] in units else float(body)
    except ValueError:
        value = -1
    if not value >= 1:
        raise RulegraphError(f"--memory-budget must be a size like 512M or 2G; got '{text}'")
    return int(value)


def cmd_explain_dataset(args) -> int:
    """``explain --input FOLDER|GLOB|FILE -o OUTDIR``: a dataset run (run/shards.py), or ``--ray``."""
    if not args.o:
        raise RulegraphError(f"--input {args.input} is a dataset: give the folder for its outputs with -o OUTDIR")
    given = [f for f in ("out", "heatmap") if getattr(args, f)]
    if given:
        raise RulegraphError(f"--{given[0]} writes one batch's result; a dataset run writes shards into -o "
                             f"{args.o}: drop --{given[0]}")
    spec = preprocess_of(args)
    options = {"target": target_of(args), "format": args.format, "shard_size": args.shard_size,
               "batch_size": args.batch_size, "memory_budget": _memory(args.memory_budget),
               "preprocess": spec, "scale": args.scale or 1.0, "column": args.column}
    if args.ray:
        from . import ray as on_ray

        summary = on_ray.explain_files(args.input, args.model, args.rules, args.o, actors=args.actors,
                                       num_gpus=args.num_gpus, output=args.output, start=args.start,
                                       class_axis=args.class_axis, max_amplification=args.max_amplification,
                                       progress=False if args.quiet else None, **options)
    else:
        explainer = Explainer(args.model, args.rules, output=args.output, start=args.start,
                              class_axis=args.class_axis, form=args.form)
        explainer.allow_nonfinite = args.allow_nonfinite
        summary = explainer.explain_dataset(args.input, args.o, progress=False if args.quiet else None,
                                            max_amplification=args.max_amplification, **options)
    print(summary)
    return 0


def _token_page(args, result, x, labels) -> None:
    """``explain --heatmap page.html``: the relevance of each token-id input, a row per batch item."""

    feeds = x if isinstance(x, dict) else {next(iter(result.attribution)): x}
    names = [k for k in result.attribution if k in feeds and np.asarray(feeds[k]).dtype.kind in "iu"]
    if not names:
        raise RulegraphError(f"--heatmap {args.heatmap}: an .html page shows token-id inputs, and this "
                             f"model's "
                             f"attributions are for {list(result.attribution)} (floats): write a .png")
    vocab = viz.read_vocab(args.vocab) if args.vocab else None
    rows = []
    for name in names:
        for i, ids in enumerate(np.asarray(feeds[name])):
            tokens = viz.tokens_of(ids, vocab) if vocab else [str(int(t)) for t in ids.reshape(-1)]
            title = viz.title_of(None if result.target is None else result.target[i], labels,
                                 method_name(args.rules), float(result.delta[i]))
            rows.append((f"row {i}, '{name}': {title}", result.attribution[name][i], tokens))
    page = viz.tokens_page(rows, args.clip, args.sign or "all")
    write_bytes(args.heatmap, page.encode("utf-8"), "--heatmap")


def _picture_options(p) -> None:
    """The options of every command that draws an attribution (viz.py)."""

    p.add_argument("--mode", choices=MODES, default="heatmap",
                   help="heatmap, overlay (blended on the input) or masked (input x |map|) (default heatmap)")
    p.add_argument("--sign", choices=list(SIGNS),
                   help="which values to draw (default: all; absolute for a saliency map)")
    p.add_argument("--clip", type=float, default=DEFAULT_CLIP,
                   help=f"the percentile of |map| that saturates the colours (default {DEFAULT_CLIP})")
    p.add_argument("--reduce", choices=list(REDUCTIONS),
                   help="channels to one map: sum, or maxabs (the value of largest |.|) (default: sum; "
                        "maxabs for a saliency map)")
    p.add_argument("--background", choices=["grey", "colour"], default="grey",
                   help="the input under an overlay in grey or in colour (default grey)")
    p.add_argument("--bgr", action="store_true", help="the input's channels are BGR (drawn as RGB; images "
                   "are read as BGR where the command reads them for the model)")
    p.add_argument("--labels", help="class names: a file of 'index,name' lines or one name per line")
    p.add_argument("--show", choices=["attribution", "saliency"],
                   help="draw x ⊙ a(x) or a(x) (default: saliency for gradient, guided-backprop, "
                        "deconvnet, "
                        "smoothgrad; attribution otherwise)")


def _picture_kwargs(args) -> dict:
    return {"mode": args.mode, "sign": args.sign, "clip": args.clip, "reduce": args.reduce,
            "background": args.background, "bgr": args.bgr, "show": args.show}


def _first_array(x):
    """The first input of a feed (a dict for several inputs) as an array."""
    return next(iter(x.values())) if isinstance(x, dict) else x


def cmd_compare(args) -> int:
    """One column per rule file, one row per batch item, on one input."""

    rules = [r for r in args.rules.split(",") if r]
    sources = _inputs_of(args) + [f for r in rules for f in rule_files(r)]
    check_output(args.o, sources, FIGURE_SUFFIXES, "-o")
    spec = preprocess_of(args)
    labels = read_labels(args.labels) if args.labels else None
    columns = []
    for name in rules:
        explainer = Explainer(args.model, name, output=args.output, start=args.start,
                              class_axis=args.class_axis)
        x = load_input(args.input, explainer, args.scale or 1.0, preprocess=spec)
        result = explainer.explain(x, target=target_of(args))
        method = method_name(name)
        maps, show = choose_maps(result, method, args.show)
        sign, reduce = show_defaults(show, args.sign, args.reduce)
        if not is_image(maps):
            raise RulegraphError(f"compare draws image attributions ([N, C, H, W] or [N, H, W]); this "
                                 f"model's "
                                 f"input gives {list(maps.shape)}: use explain --heatmap per rule file")
        xs = _first_array(x)
        images = [display_image(xs[i], args.bgr) for i in range(len(maps))]
        titles = [title_of(None if result.target is None else result.target[i], labels,
                           method + (" (saliency)" if show == "saliency" else ""),
                           None if show == "saliency" else float(result.delta[i]))
                  for i in range(len(maps))]
        columns.append(row_panels(maps, images, titles, mode=args.mode, sign=sign, clip=args.clip,
                                  reduce=reduce, background=args.background))
        print(f"{method}: {summary(result)}")

    save_figure(figure([list(row) for row in zip(*columns)]), args.o, sources, "-o")
    print(f"grid written to {args.o}")
    return 0


def cmd_show(args) -> int:
    """Draw a saved attribution (``explain --out``, or the compiled explainer's output run anywhere)."""

    if Path(args.attribution).suffix.lower() == ".onnx":
        return _show_preprocess(args.attribution)
    sources = [Path(args.attribution)] + ([Path(args.input)] if args.input else []) + \
        [Path(p) for p in (args.labels, args.vocab, args.tokens) if p]
    if args.o:
        check_output(args.o, sources, viz.FIGURE_SUFFIXES + (".html",), "-o")
    maps = _load_array(args.attribution, "attribution")
    if args.tokens or args.token_list:
        return _show_tokens(args, maps)
    if args.o is None:
        raise RulegraphError("show needs -o FILE for a picture (tokens print to the terminal)")
    if maps.ndim == 0:
        maps = maps.reshape(1, 1)
    images = signals = None
    if args.input:
        images, signals = _display_inputs(args, maps)
    titles = [args.title or ""] * len(maps)
    sign, reduce = viz.show_defaults("attribution", args.sign, args.reduce)
    viz.render_array(maps, images, args.mode, sign, args.clip, reduce, args.background, titles,
                     signals, path=args.o, inputs=sources)
    print(f"picture written to {args.o}")
    return 0


def _display_inputs(args, maps):
    """``show --input``: the images under each row (an image file resized to the map), or the 1-D signals."""

    if Path(args.input).suffix.lower() in IMAGE_SUFFIXES:
        if not is_image(maps):
            raise RulegraphError(f"--input {args.input} is an image but the attribution is "
                                 f"{list(maps.shape)}, "
                                 f"not [N, C, H, W] or [N, H, W]")
        from PIL import Image

        try:
            with Image.open(args.input) as image:
                size = (maps.shape[-1], maps.shape[-2])
                rgb = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR))
        except (OSError, ValueError) as exc:
            raise RulegraphError(f"--input {args.input} is not a readable image ({exc})") from None
        return [rgb.astype(np.float64) / 255] * len(maps), None
    x = _load_array(args.input, "--input")
    if len(x) != len(maps):
        raise RulegraphError(f"--input {args.input} has {len(x)} rows, the attribution {len(maps)}; "
                             f"they must match")
    if is_image(maps):
        return [display_image(x[i], args.bgr) for i in range(len(maps))], None
    return None, x.reshape(len(x), -1)


def _show_tokens(args, maps) -> int:

    if args.token_list:
        tokens = args.token_list.split(",")
    else:
        if not args.vocab:
            raise RulegraphError("--tokens ids.npy needs --vocab vocab.txt (one token per line, line k is "
                                 "id k)")
        tokens = viz.tokens_of(_load_array(args.tokens, "--tokens")[0], viz.read_vocab(args.vocab))
    relevance = maps[0] if maps.ndim > 1 else maps
    if args.o and Path(args.o).suffix.lower() == ".html":
        page = viz.tokens_html(relevance, tokens, args.clip, args.sign or "all")
        write_bytes(args.o, page.encode("utf-8"), "-o")
        print(f"token relevance written to {args.o}")
    else:
        if args.o:
            raise RulegraphError(f"-o {args.o}: token relevance is written as .html (or printed without -o)")
        print(viz.tokens_ansi(relevance, tokens, None, args.clip, args.sign or "all"))
    return 0


def cmd_compile(args) -> int:
    _cam_or_rules(args)
    check_output(args.o, _inputs_of(args), what="-o")
    if args.method:
        cam = Cam(args.model, args.method, args.layer, output=args.output, start=args.start,
                  class_axis=args.class_axis, preprocess=preprocess_of(args))
        path = cam.save(args.o)
        compiled = cam.compiled()
        print(f"{args.method} model written to {path}: layer '{compiled.layer}', "
              f"inputs {compiled.input_names}, map output '{compiled.guided_output or compiled.cam_output}'")
        return 0
    if args.layer:
        raise RulegraphError("--layer names the CAM layer of --method; compile with a rule file writes the "
                             "whole pass (explain --layer gives the attribution at a layer)")
    explainer = Explainer(args.model, args.rules, output=args.output, start=args.start,
                          class_axis=args.class_axis, preprocess=preprocess_of(args))
    path = explainer.save(args.o, external_data=args.external_data or None)
    compiled = explainer.saved()
    print(f"explainer written to {path}: inputs {compiled.input_names}, attribution outputs "
          f"{list(compiled.attribution.values())}")
    if explainer.preprocess is not None:
        print(f"preprocessing saved in its metadata ('{pre.METADATA_KEY}'): "
              f"{explainer.preprocess.describe()}")
    return 0


def cmd_check(args) -> int:
    sources = _inputs_of(args)
    if args.output_file:
        check_output(args.output_file, sources, what="--output-file")
    x = None
    if args.input:
        # check diagnoses NaN/Inf in an input (it names them as the cause) instead of refusing it
        x = load_input(args.input, Explainer(args.model, args.rules), args.scale or 1.0, allow_nonfinite=True,
                       preprocess=preprocess_of(args))
    samples = 0 if x is not None else args.samples
    report = check(args.model, args.rules, x=x, samples=samples, tolerance=args.tolerance,
                   probes=args.probes, output=args.output, start=args.start,
                   max_amplification=args.max_amplification)
    text = {"text": report.to_text, "json": report.to_json, "junit": report.to_junit}[args.format]()
    if args.profile:
        text += "\n" + placement_line(args, x)
    if args.output_file:
        write_bytes(args.output_file, (text if text.endswith("\n") else text + "\n").encode("utf-8"),
                    "--output-file")
        print(f"report written to {args.output_file}: {'OK' if report.ok else 'FAILED'}")
    else:
        print(text)
    return 0 if report.ok else 1


def placement_line(args, x) -> str:
    """One line: where onnxruntime ran the explainer's nodes (its profile of one run), and the
    nodes CUDA has no kernel for (the kernel registry, kernels.py)."""
    explainer = Explainer(args.model, args.rules, output=args.output, start=args.start)
    if x is None:
        x = sample_inputs(explainer.graph, 1)
    counts = explainer.placement(x)
    ran = ", ".join(f"{provider} {n}" for provider, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    fallbacks = cuda_fallbacks(explainer.compiled().model)
    named = "; ".join(f.line() for f in fallbacks[:5]) + (" ..." if len(fallbacks) > 5 else "")
    cuda = (f"{len(fallbacks)} node(s) have no CUDA kernel and would run on the CPU under CUDA: {named}"
            if fallbacks else "every node has a CUDA kernel")
    return f"profile: kernels run per provider: {ran}; {cuda}"


def cmd_lint(args) -> int:
    ruleset = dsl.load(args.rules)
    print(f"{args.rules}: ok ({len(ruleset.bindings)} bindings, quantity {ruleset.quantity}, bias {ruleset.bias})")
    return 0


def cmd_ops(args) -> int:
    graph = load(args.model)
    ruleset = dsl.load(args.rules)
    start = find_start(graph, ruleset, args.output, args.start)
    if args.summary or args.json:
        warn_unmatched(graph, ruleset, args.output, args.start)
        report = summarize(graph, ruleset, start)
        print(report.to_json() if args.json else report.to_text())
        if not args.json:
            print(cuda_line(graph))
        return 1 if report.total.with_rule < report.total.on_path else 0
    rows = assign(graph, ruleset, path_nodes(graph, start))
    warn_unmatched(graph, ruleset, args.output, args.start)
    width = max([len(r.node.name) for r in rows] + [4])
    # a fused node (graph/fuse.py) names the nodes it stands for: "Gelu [fused: /mlp/Div, /mlp/Erf, ...]"
    op_types = {r.node.name: r.node.op_type + (f" [fused: {', '.join(m.name for m in r.node.members)}]"
                                               if r.node.members else "") for r in rows}
    op_width = max([len(t) for t in op_types.values()] + [20])
    print(f"{'node':<{width}}  {'op type':<{op_width}} {'kind':<12} rule")
    missing = 0
    for r in rows:
        if r.held:
            rule = HELD
        elif r.problem:
            missing += 1
            rule = "!! " + r.problem
        else:
            rule = f"{r.binding.rule}    ({r.binding.selector} at {r.binding.location})"
        print(f"{r.node.name:<{width}}  {op_types[r.node.name]:<{op_width}} {r.node.kind or '?':<12} {rule}")
    print(f"{len(rows)} nodes on the relevance path (start: '{start}'); {missing} without a usable rule")
    print(cuda_line(graph))
    return 1 if missing else 0


def cuda_line(graph) -> str:
    """The model's nodes CUDA has no kernel for (kernels.py): they run on the CPU under CUDA. The
    nodes rulegraph adds for the backward all have one (tests/test_cuda_kernels.py)."""
    fallbacks = cuda_fallbacks(graph.model)
    if not fallbacks:
        return "CUDA: every node of the model has a CUDA kernel"
    return (f"CUDA: {len(fallbacks)} node(s) of the model have no CUDA kernel and run on the CPU under CUDA "
            f"(onnxruntime copies across the device boundary): " + "; ".join(f.line() for f in fallbacks))


def cmd_demo(args) -> int:
    models = bundled_models_dir()
    model, image = models / "digits_cnn.onnx", models / "digit_3.png"
    sources = [model, image] + rule_files(args.rules)
    check_output(args.heatmap, sources, heatmap_suffixes(), "--heatmap")
    explainer = Explainer(model, args.rules)
    x = load_input(str(image), explainer)
    result = explainer.explain(x)
    logits = next(iter(result.outputs.values()))[0]
    print(f"model: {model.name} (bundled digits CNN), input: {image.name}, rules: {args.rules}")
    print(f"predicted class: {int(np.argmax(logits))} (logit {logits.max():.3f}) on {result.device}")
    print(summary(result))
    render(result, x=x, mode="heatmap", method=method_name(args.rules), path=args.heatmap, inputs=sources)
    print(f"heatmap written to {args.heatmap}")
    return 0


def _show_preprocess(path: str) -> int:
    """``rulegraph show explainer.onnx``: the preprocessing its metadata records."""
    spec = pre.from_metadata(path)
    if spec is None:
        print(f"{path}: no preprocessing recorded (compile it with --preprocess to save one)")
    else:
        print(f"{path}: preprocessing {spec.describe()}")
        print(spec.to_json())
    return 0


def _numbers(text: str, option: str, example: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise RulegraphError(f"{option} {text}: expected comma-separated numbers such as {example}") from None


def _size_flag(text: str | None, option: str, square: bool):
    """``--resize 256`` (shorter side) / ``--resize 256,320`` (H, W); ``--crop 224`` is 224x224."""
    if text is None:
        return None
    values = _ints(text, option, "224 or 224,224")
    if len(values) == 1:
        return (values[0], values[0]) if square else values[0]
    if len(values) == 2:
        return tuple(values)
    raise RulegraphError(f"{option} {text}: expected one size or H,W")


def preprocess_of(args) -> pre.Preprocess | None:
    """The preprocessing of a command: ``--preprocess NAME|FILE`` (else ``MODEL.preprocess.json`` when
    present), then the flags on top; None when nothing describes it (images read as [0, scale])."""
    base = pre.resolve(args.preprocess) if args.preprocess else None
    if base is None and pre.beside(args.model) is not None:
        base = pre.read_file(pre.beside(args.model))
    changes = {"resize": _size_flag(args.resize, "--resize", square=False),
               "crop": _size_flag(args.crop, "--crop", square=True),
               "mean": _numbers(args.mean, "--mean", "0.485,0.456,0.406") if args.mean else None,
               "std": _numbers(args.std, "--std", "0.229,0.224,0.225") if args.std else None,
               "order": "BGR" if args.bgr else None, "layout": "NHWC" if args.nhwc else None,
               "scale": args.scale}
    if base is None and all(v is None for v in changes.values()):
        return None
    spec = (base or pre.Preprocess()).replace(**changes)
    if spec.order == "BGR" and hasattr(args, "mode"):
        args.bgr = True  # pictures draw the BGR input as RGB
    if spec.labels and hasattr(args, "mode") and not args.labels:
        args.labels = spec.labels
    return spec


def _preprocess_options(p, bgr: bool, scale: bool = True) -> None:
    """How images become the model's input (run/preprocess.py); ``bgr``: add ``--bgr`` here (the
    picture options already have it)."""
    p.add_argument("--preprocess", help=f"a preset ({', '.join(pre.PRESETS)}) or a .json file (default: "
                   f"MODEL.preprocess.json when present); the flags below change it")
    if scale:
        p.add_argument("--scale", type=float, help="images are read as values in [0, scale] (default 1)")
    p.add_argument("--resize", help="resize the shorter side to S (256), or to H,W")
    p.add_argument("--crop", help="centre crop H,W (224 or 224,224)")
    p.add_argument("--mean", help="subtract per channel, in the scaled range (0.485,0.456,0.406)")
    p.add_argument("--std", help="divide per channel (0.229,0.224,0.225)")
    if bgr:
        p.add_argument("--bgr", action="store_true", help="the model takes BGR channels")
    p.add_argument("--nhwc", action="store_true", help="the model takes [N, H, W, C] (default NCHW)")


def _dataset_options(p) -> None:
    """A dataset run's flags (run/shards.py, ray.py)."""
    p.add_argument("-o", help="dataset run: the folder for its shards (created if missing; a run there is resumed)")
    p.add_argument("--format", choices=list(FORMATS), default="parquet",
                   help="dataset run: parquet (the dataset extra) or npz shards")
    p.add_argument("--shard-size", type=int, help="dataset run: samples per shard (default: to the memory "
                   f"budget, at most {MAX_SHARD_SIZE})")
    p.add_argument("--batch-size", type=int, help="dataset run: samples per explainer run (default: to the "
                   "memory budget)")
    p.add_argument("--memory-budget", default="1G", help="dataset run: memory for one batch (512M, 2G)")
    p.add_argument("--column", help="dataset run on a parquet file: the column of images (bytes) or tensors")
    p.add_argument("--quiet", action="store_true", help="dataset run: no progress bar")
    p.add_argument("--ray", action="store_true", help="dataset run on Ray Data (the ray extra)")
    p.add_argument("--actors", type=int, default=2, help="--ray: actors, one onnxruntime session each")
    p.add_argument("--num-gpus", type=float, default=0, help="--ray: GPUs per actor")


def _max_amplification(p, help_text: str) -> None:
    p.add_argument("--max-amplification", type=float, default=DEFAULT_MAX_AMPLIFICATION,
                   help=f"{help_text} (default {DEFAULT_MAX_AMPLIFICATION:g})")


def target_options(p) -> None:
    """The target flags of every command that explains (targets.py: the forms and the class axis)."""
    p.add_argument("--target", default="argmax", help="argmax, class indices (3 or 3,5), or a seed .npy")
    p.add_argument("--at", help="for outputs with position axes: the class at this position (20, or 5,7)")
    p.add_argument("--region", help="the class summed over a region, a start:stop per position axis "
                   "(10:20,30:40)")
    p.add_argument("--mask", help="the class summed over positions weighted by this .npy mask")
    p.add_argument("--all-positions", action="store_true", help="the class summed over all positions")
    p.add_argument("--versus", help="contrastive: minus this class's logit (at the same positions)")
    p.add_argument("--class-axis", type=int, help="the start tensor's class axis (default: the final "
                   "Softmax's axis, else 1 for [N, C] and [N, C, H, W], 2 for [N, T, C])")


def cmd_visualize(args) -> int:
    """``visualize MODEL --layer T --channels 0-15 -o grid.png``: feature visualization (run/featviz.py)."""
    from .run import featviz

    channels = featviz.parse_channels(args.channels)
    direction = None
    if args.direction:
        direction = read_npy(args.direction)
    vis = featviz.Visualizer(args.model, args.layer, preprocess_of(args)).run(
        channels, args.objective, direction, steps=args.steps, lr=args.lr, seed=args.seed)
    for label, first, last in zip(vis.channels, vis.history[0], vis.history[-1]):
        print(f"{vis.layer} {args.objective} {label}: objective {first:.4g} -> {last:.4g}")
    titles = [f"{vis.layer} {args.objective} {c}" for c in vis.channels]
    viz.image_tiles(vis.images, titles, args.o, inputs=model_files(args.model), columns=args.columns)
    print(f"grid written to {args.o}")
    return 0


def _unit_list(text: str | None, option: str) -> list[int] | None:
    """``--units``/``--channels`` as a list (``0-15``, ``3,5,9``), or None for all."""
    from .run.featviz import parse_channels

    try:
        return None if text is None else parse_channels(text)
    except RulegraphError as exc:
        raise RulegraphError(str(exc).replace("--channels", option)) from None


def _dataset_reading(args) -> dict:
    """The dataset options of the views (units, represent): batch size, budget, progress, preprocessing."""
    return {"batch_size": args.batch_size, "memory_budget": _memory(args.memory_budget),
            "progress": False if args.quiet else None, "preprocess": preprocess_of(args),
            "scale": args.scale or 1.0, "column": args.column}


#: units drawn at most in one picture (a row each); --json holds every unit
MAX_UNIT_ROWS = 64


def cmd_units(args) -> int:
    """``units MODEL --layer T --input DATA -k 9 -o grid.png``: the top-k samples per unit (run/units.py)."""
    from .run.units import top_examples

    sources = model_files(args.model) + [Path(args.input)]
    check_output(args.o, sources, FIGURE_SUFFIXES, "-o")
    if args.json:
        check_output(args.json, sources, [".json"], "--json")
    found = top_examples(args.model, args.layer, args.input, k=args.k,
                         units=_unit_list(args.units, "--units"), **_dataset_reading(args))
    print(f"'{found.layer}': top {found.values.shape[1]} of {found.samples} samples for {len(found.units)} "
          f"units (axis {found.unit_axis}); receptive field: {found.field.text()}")
    for u, values, ids in zip(found.units, found.values, found.ids):
        print(f"unit {u}: " + ", ".join(f"{name} ({v:.4g})" for name, v in zip(ids, values)))
    shown = found
    if len(found.units) > MAX_UNIT_ROWS:
        from dataclasses import replace

        warnings.warn(f"the picture shows the first {MAX_UNIT_ROWS} of {len(found.units)} units (choose them "
                      f"with --units; --json holds every unit)", RulegraphWarning, stacklevel=1)
        shown = replace(found, units=found.units[:MAX_UNIT_ROWS], values=found.values[:MAX_UNIT_ROWS],
                        crops=found.crops[:MAX_UNIT_ROWS])
    save_figure(viz.unit_examples_figure(shown, bgr=args.bgr), args.o, sources, "-o")
    print(f"grid written to {args.o}")
    if args.json:
        import json

        write_bytes(args.json, (json.dumps(found.to_json(), indent=1) + "\n").encode(), "--json")
        print(f"examples written to {args.json}")
    return 0


def _sample_labels(path: str) -> np.ndarray:
    """``--labels``: one integer class per sample, a .npy array or a text file of one number a line."""
    if Path(path).suffix.lower() == ".npy":
        return read_npy(path)
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise RulegraphError(f"--labels {path}: cannot read it ({exc})") from None
    bad = next((i for i, line in enumerate(lines, 1) if not line.lstrip("-").isdigit()), None)
    if bad is not None:
        raise RulegraphError(f"{path}:{bad}: expected one integer class per line; got '{lines[bad - 1]}'")
    return np.array([int(line) for line in lines], dtype=np.int64)


def cmd_represent(args) -> int:
    """``represent MODEL --layer T --input DATA --labels L -o map.png``: a t-SNE/PCA map of a tensor
    over a dataset; ``--grid``: the units of a dense layer on a grid per class (run/representation.py)."""
    from .run import representation as rep

    sources = model_files(args.model) + [Path(args.input)] + ([Path(args.labels)] if args.labels else [])
    for option, path in (("-o", args.o), ("--grid", args.grid)):
        if path:
            check_output(path, sources, FIGURE_SUFFIXES, option)
    if not args.o and not args.grid:
        raise RulegraphError("give -o map.png (the 2-D map) and/or --grid grid.png (the unit grid)")
    labels = _sample_labels(args.labels) if args.labels else None
    colour = args.colour or ("label" if labels is not None else "prediction")
    names = read_labels(args.class_names) if args.class_names else None
    reading = _dataset_reading(args)
    if args.o:
        found = rep.represent(args.model, args.layer, args.input, labels=labels, method=args.method,
                              seed=args.seed, perplexity=args.perplexity, **reading)
        classes = found.colours(colour)
        title = (f"{found.method} of '{found.layer}' over {len(classes)} samples, coloured by {colour}")
        save_figure(viz.embedding_figure(found.embedding, classes, title, names), args.o, sources, "-o")
        print(f"map of {len(classes)} samples written to {args.o}")
    if args.grid:
        grid = rep.unit_grid(args.model, args.layer, args.input, labels=labels if colour == "label" else None,
                             **reading)
        save_figure(viz.unit_grid_figure(grid, names), args.grid, sources, "--grid")
        rows, columns = grid.cells.shape
        print(f"unit grid ({grid.means.shape[1]} units on {rows}x{columns}, {len(grid.classes)} classes) "
              f"written to {args.grid}")
    return 0


def cmd_crp(args) -> int:
    """``crp MODEL RULES --input X --layer T --channels 0-7 -o grid.png``: each channel's share of the
    relevance at a layer as an input map (run/cam.py ``crp``), a row per input: the full map, then a
    tile per channel (one colour scale for the channels of a row)."""
    from .run.cam import crp

    sources = _inputs_of(args)
    check_output(args.o, sources, FIGURE_SUFFIXES, "-o")
    if args.out:
        check_output(args.out, sources, [".npz"], "--out")
    explainer = Explainer(args.model, args.rules, output=args.output, class_axis=args.class_axis)
    x = load_input(args.input, explainer, args.scale or 1.0, preprocess=preprocess_of(args))
    found = crp(explainer, x, args.layer, _unit_list(args.channels, "--channels"), target=target_of(args),
                max_amplification=args.max_amplification)
    full = found.result.map
    rows = []
    for i in range(len(full)):
        share = found.maps[i].reshape(len(found.channels), -1).sum(axis=1)
        print(f"row {i}: {summary_line(found.result, i)}; at '{found.layer}': "
              + ", ".join(f"channel {c} {v:.4g}" for c, v in zip(found.channels, share))
              + f" (full map {float(full[i].sum()):.4g})")
        rows.append(viz.concept_panels(full[i], found.maps[i], found.channels, args.clip))
    fig = figure(rows, size=1.6)
    fig.suptitle(f"{method_name(args.rules)}: each channel's share of the relevance at '{found.layer}' "
                 f"(the channels of a row on one colour scale)", fontsize=9)
    save_figure(fig, args.o, sources, "-o")
    print(f"grid written to {args.o}")
    if args.out:
        write_with(args.out, lambda tmp: np.savez(tmp, maps=found.maps, full=full,
                                                  channels=np.asarray(found.channels)), "--out")
        print(f"maps written to {args.out}")
    return 0


def summary_line(result, i: int) -> str:
    """``class 3, start value 4.1`` of row ``i``."""
    cls = "" if result.target is None else f"class {int(result.target[i])}, "
    return f"{cls}start value {float(result.start_value[i]):.4g}"


def _view_options(p) -> None:
    """The dataset flags of the unit and representation views (run/layerdata.py)."""
    p.add_argument("--batch-size", type=int, help="samples per run (default: to the memory budget)")
    p.add_argument("--memory-budget", default="1G", help="memory for one batch (512M, 2G)")
    p.add_argument("--column", help="a parquet input: the column of images (bytes) or tensors")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _preprocess_options(p, bgr=True)


def cmd_windows(args) -> int:
    """``windows MODEL --window L --input DATA -o grid.png``: per unit of a recurrent node, the
    activation-weighted average input window (run/windows.py)."""
    from .run import windows

    inputs = model_files(args.model) + ([Path(args.input)] if Path(args.input).exists() else [])
    check_output(args.o, inputs, FIGURE_SUFFIXES, "-o")
    if args.npz:
        check_output(args.npz, inputs + [Path(args.o)], (".npz",), "--npz")
    per_sample = None if args.per_sample == "all" else _positive_int(args.per_sample, "--per-sample")
    result = windows.unit_windows(args.model, args.layer, args.input, args.window, state=args.state,
                                  reduce=args.reduce, per_sample=per_sample, seed=args.seed,
                                  batch_size=args.batch_size, time_axis=args.time_axis, pad=args.pad)
    print(result.describe())
    titles = [f"unit {k}" for k in range(len(result.weights))]
    viz.window_grid(windows.tile_images(result, stretch=not args.raw), titles, args.o, inputs, args.columns,
                    title=result.describe())
    print(f"grid written to {args.o}")
    if args.npz:
        windows.save_npz(result, args.npz)
        print(f"averages written to {args.npz}")
    return 0


def _positive_int(text: str, option: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise RulegraphError(f"{option} is a number ≥ 1 or 'all', got '{text}'")
    return value


def cmd_evaluate(args) -> int:
    """Faithfulness metrics and sanity checks of each rule file (and random attributions) on a batch."""
    from .run import evaluate as ev

    rules = [r for r in args.rules.split(",") if r]
    sources = _inputs_of(args) + [f for r in rules for f in rule_files(r)]
    sources += [Path(f) for f in args.input.split(",") if Path(f).is_file()]
    outputs = {"--json": args.json, "--csv": args.csv, "--plot": args.plot}
    for option, path in outputs.items():
        if path:
            check_output(path, sources, (".json",) if option == "--json" else (".csv",) if option == "--csv"
                         else FIGURE_SUFFIXES, option)
    spec = preprocess_of(args)
    target = _parse_target(args.target)
    if isinstance(target, np.ndarray):
        raise RulegraphError("evaluate scores classes: --target is argmax or class indices (3 or 3,5)")
    settings = ev.Settings(patch_size=args.patch_size, regions=args.regions, features_in_step=args.step,
                           baseline=_baseline_of(args.baseline), seed=args.seed, softmax=not args.logits)
    metrics = [m for m in args.metrics.split(",") if m] if args.metrics else None
    if is_dataset_path(args.input) or args.batch_size or args.limit:   # streamed, batch by batch
        from .run.evaluate_dataset import DEFAULT_BATCH_SIZE, evaluate_dataset

        if args.plot:
            raise RulegraphError("--plot needs the curves, which a dataset evaluation does not keep; "
                                 "evaluate a batch file (.npy) for the plot")
        result = evaluate_dataset(args.model, rules, args.input, target=target, metrics=metrics,
                                  settings=settings, random=not args.no_random, output=args.output,
                                  show=args.show, batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
                                  limit=args.limit, progress=False if args.quiet else None, preprocess=spec,
                                  scale=args.scale or 1.0, column=args.column)
    else:
        reader = Explainer(args.model, rules[0] if rules else "gradient", output=args.output)
        parts = [load_input(path, reader, args.scale or 1.0, preprocess=spec)
                 for path in args.input.split(",")]
        x = np.concatenate([_first_array(part) for part in parts])
        result = ev.evaluate(args.model, rules, x, target=target, metrics=metrics, settings=settings,
                             random=not args.no_random, output=args.output, show=args.show)
    print(result.text())
    print("ranking: " + " > ".join(result.ranking(args.rank_by)))
    if args.json:
        write_bytes(args.json, result.to_json().encode(), "--json")
    if args.csv:
        write_bytes(args.csv, result.to_csv().encode(), "--csv")
    if args.plot:
        save_figure(viz.plot_evaluation(result), args.plot, sources, "--plot")
    for option, path in outputs.items():
        if path:
            print(f"{option[2:]} written to {path}")
    return 0


def _baseline_of(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rulegraph", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def model_and_rules(p, cam: bool = False):
        p.add_argument("model", help="the ONNX model file")
        p.add_argument("--rules", required=not cam, help="a rule file, or a bundled one's name (lrp-epsilon)"
                       + ("; or --method for a CAM" if cam else ""))
        if cam:
            p.add_argument("--method", choices=CAM_METHODS,
                           help="a CAM instead of a rule file: the map at --layer from the gradient pass, "
                                "upsampled and min-max normalized as pytorch-grad-cam")
            p.add_argument("--layer", help="the tensor or node of --method (default: the last 4-D "
                           "activation before the global pooling); with --rules: also give the attribution "
                           "at this tensor")
        p.add_argument("--output", help="the model output to explain (default: the first)")
        p.add_argument("--start", help="start at this intermediate tensor instead")

    p = sub.add_parser("explain", help="attribute one input batch")
    model_and_rules(p, cam=True)
    p.add_argument("--input", required=True, help=".npy, .npz or an image file; with -o a dataset: a folder, "
                   "a quoted glob ('shards/*.npy'), a .npy/.npz (a sample per row) or a .parquet file")
    target_options(p)
    _preprocess_options(p, bgr=False)
    p.add_argument("--allow-nonfinite", action="store_true", help="explain inputs holding NaN or Inf "
                   "(refused by default)")
    p.add_argument("--form", choices=FORMS, default="standard", help="gradient-x-input: compile a relevance "
                   "file as Gradient × Input with modified Jacobians (the rules at ε = 0, faster)")
    _dataset_options(p)
    p.add_argument("--out", help="write the attribution of the first input here (.npy)")
    p.add_argument("--layer-out", help="write the attribution at --layer here (.npy)")
    p.add_argument("--heatmap", help="write a picture of the attribution here (.png), one row per batch "
                   "item; .html: the relevance of token-id inputs")
    p.add_argument("--vocab",
                   help="with --heatmap x.html: vocabulary file, one token per line (line k is id k)")
    _picture_options(p)
    _max_amplification(p, "warn when a row's Σ|attribution| / |start value| exceeds this")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("compare", help="a grid of pictures: one column per rule file, one row per batch item")
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("--rules", required=True, help="rule files or bundled names, comma-separated "
                   "(lrp-epsilon,gradient)")
    p.add_argument("--output", help="the model output to explain (default: the first)")
    p.add_argument("--start", help="start at this intermediate tensor instead")
    p.add_argument("--input", required=True, help=".npy, .npz or an image file")
    target_options(p)
    _preprocess_options(p, bgr=False)
    p.add_argument("-o", required=True, help="where to write the grid (.png, .pdf, .svg, ...)")
    _picture_options(p)
    p.set_defaults(run=cmd_compare, mode="overlay")

    p = sub.add_parser("show", help="draw a saved attribution (.npy, batch first)")
    p.add_argument("attribution",
                   help="the attribution .npy (explain --out, or the compiled explainer's output); a "
                        "compiled explainer .onnx: print the preprocessing its metadata records")
    p.add_argument("--input", help="the input explained (image file or .npy), drawn under overlay / masked")
    p.add_argument("-o", help="the picture (.png, .pdf, .svg, ...) or, for tokens, .html")
    p.add_argument("--title", help="a title for every panel")
    p.add_argument("--tokens", help="token ids .npy [N, T] of the explained text (with --vocab)")
    p.add_argument("--vocab", help="vocabulary file: one token per line, line k (from 0) is id k")
    p.add_argument("--token-list", help="the tokens themselves, comma-separated")
    _picture_options(p)
    p.set_defaults(run=cmd_show)

    p = sub.add_parser("compile", help="write the explainer ONNX model (forward + relevance pass)")
    model_and_rules(p, cam=True)
    p.add_argument("-o", required=True, help="where to write the explainer .onnx")
    p.add_argument("--class-axis", type=int, help="the start tensor's class axis (see explain)")
    p.add_argument("--external-data", action="store_true",
                   help="weights in <o>.data beside the explainer (the default over 1 GiB of weights)")
    _preprocess_options(p, bgr=True)
    p.set_defaults(run=cmd_compile)

    p = sub.add_parser("check", help="coverage, conservation and consistency of a rule file on a model (CI)")
    model_and_rules(p)
    p.add_argument("--input", help="measure conservation on this input (.npy, .npz, image)")
    p.add_argument("--samples", type=int, default=4, help="else on N seeded random inputs (0: static only)")
    _preprocess_options(p, bgr=True)
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest leak allowed, relative to the start value")
    p.add_argument("--probes", action="store_true", help="also run the consistency probes")
    p.add_argument("--profile", action="store_true",
                   help="also say where onnxruntime ran the explainer's nodes (one profiled run)")
    _max_amplification(p, "fail when Σ|attribution| / |start value| exceeds this "
                          "(a map that conserves by cancellation)")
    p.add_argument("--format", choices=["text", "json", "junit"], default="text")
    p.add_argument("--output-file", help="write the report here instead of standard output")
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("lint", help="check a rule file on its own")
    p.add_argument("rules")
    p.set_defaults(run=cmd_lint)

    p = sub.add_parser("ops", help="which node gets which rule; --summary: the coverage per op type")
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("--rules", default="gradient", help="a rule file, or a bundled one's name (default: gradient)")
    p.add_argument("--output", help="the model output to explain (default: the first)")
    p.add_argument("--start", help="start at this intermediate tensor instead")
    p.add_argument("--summary", action="store_true", help="per op type and kind: nodes, on the relevance path, "
                   "with a usable rule (which), off the path, the share covered; and the total")
    p.add_argument("--json", action="store_true", help="the summary as JSON (implies --summary)")
    p.set_defaults(run=cmd_ops)

    p = sub.add_parser("visualize", help="feature visualization: inputs optimized from noise to excite "
                       "channels of a tensor, as a grid")
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("--layer", required=True, help="the tensor or node whose channels are shown")
    p.add_argument("--channels", default="0-7", help="channels: 0-15, 3,5,9 (default 0-7)")
    p.add_argument("--objective", choices=("channel", "neuron", "direction"), default="channel",
                   help="a channel's mean, its centre neuron, or a --direction over channels")
    p.add_argument("--direction", help=".npy: a vector over the channels (or one per row) for "
                   "--objective direction")
    p.add_argument("--steps", type=int, default=256, help="Adam steps (default 256)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the noise and transformations")
    p.add_argument("--columns", type=int, default=8, help="tiles per row of the grid")
    _preprocess_options(p, bgr=True)
    p.add_argument("-o", required=True, help="where to write the grid (.png, .pdf, .svg, ...)")
    p.set_defaults(run=cmd_visualize)

    p = sub.add_parser("units", help="dataset examples: the k samples that most activate each unit of a "
                       "tensor, as a grid")
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("--layer", required=True, help="the tensor or node whose units (channels of [N, C, ...], "
                   "features of [N, F] or [N, T, D]) are shown")
    p.add_argument("--input", required=True, help="the dataset: a folder, a quoted glob ('shards/*.npy'), a "
                   ".npy/.npz (a sample per row) or a .parquet file")
    p.add_argument("-k", type=int, default=9, help="examples per unit (default 9)")
    p.add_argument("--units", help="units: 0-15, 3,5,9 (default all)")
    _view_options(p)
    p.add_argument("-o", required=True, help="where to write the grid (.png, .pdf, .svg, ...)")
    p.add_argument("--json", help="write every unit's examples (id, value, position, crop box) here (.json)")
    p.set_defaults(run=cmd_units)

    p = sub.add_parser("represent", help="representation map: a tensor over a dataset in 2-D (t-SNE, PCA), "
                       "coloured by label or prediction; --grid: a dense layer's units per class")
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("--layer", required=True, help="the tensor or node (flattened per sample)")
    p.add_argument("--input", required=True, help="the dataset: a folder, a quoted glob, a .npy/.npz (a "
                   "sample per row) or a .parquet file")
    p.add_argument("--labels", help="one integer class per sample: a .npy, or a text file of one number a "
                   "line")
    p.add_argument("--colour", choices=["label", "prediction"],
                   help="colour the points by --labels or by the model's prediction (default: label when "
                        "given)")
    p.add_argument("--class-names", help="legend names: a file of 'index,name' lines or one name per line")
    p.add_argument("--method", choices=["tsne", "pca"], default="tsne",
                   help="tsne (openTSNE, the views extra) or pca (default tsne)")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default 30)")
    p.add_argument("--seed", type=int, default=0, help="t-SNE random seed (default 0)")
    _view_options(p)
    p.add_argument("-o", help="where to write the map (.png, .pdf, .svg, ...)")
    p.add_argument("--grid", help="where to write the unit grid of a dense [N, U] layer, one heat map per "
                   "class")
    p.set_defaults(run=cmd_represent)

    p = sub.add_parser("crp", help="concept relevance: each channel's share of the relevance at a layer as "
                       "an input map, a tile per channel beside the full map")
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("rules", help="a rule file, or a bundled one's name (lrp-epsilon)")
    p.add_argument("--input", required=True, help=".npy, .npz or an image file")
    p.add_argument("--layer", required=True, help="the tensor or node whose channels split the relevance")
    p.add_argument("--channels", default="0-7", help="channels: 0-15, 3,5,9 (default 0-7)")
    p.add_argument("--output", help="the model output to explain (default: the first)")
    target_options(p)
    _preprocess_options(p, bgr=True)
    p.add_argument("--clip", type=float, default=DEFAULT_CLIP,
                   help=f"the percentile of |map| that saturates the colours (default {DEFAULT_CLIP})")
    _max_amplification(p, "warn when a row's Σ|attribution| / |start value| exceeds this")
    p.add_argument("-o", required=True, help="where to write the grid (.png, .pdf, .svg, ...)")
    p.add_argument("--out", help="write the maps here (.npz: maps [N, M, ...], full [N, ...], channels)")
    p.set_defaults(run=cmd_crp)

    p = sub.add_parser("windows", help="recurrent units: per hidden unit, the average of the input windows "
                       "weighted by its activation, as a grid")
    p.add_argument("model", help="the ONNX model file (with an LSTM, GRU or RNN node)")
    p.add_argument("--layer", help="the recurrent node, or its output Y/Y_h (hidden state) or Y_c (cell "
                   "state); default: the only recurrent node")
    p.add_argument("--state", choices=("h", "c"), help="h: the hidden state (default), c: an LSTM's cell "
                   "state")
    p.add_argument("--window", type=int, required=True, help="L: steps per window")
    p.add_argument("--input", required=True, help="the dataset: .npy/.npz samples [S, T, ...] (a sample per "
                   "row), a folder, a glob or a .parquet file")
    p.add_argument("--reduce", choices=("last", "max"), default="last", help="the unit's activation at "
                   "the window's last step (default) or its largest over the window's steps")
    p.add_argument("--per-sample", default="4", help="windows drawn per sample, or 'all' starts (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window starts (default 0)")
    p.add_argument("--batch-size", type=int, default=256, help="windows per run (default 256)")
    p.add_argument("--time-axis", type=int, default=1, help="the model input's time axis (default 1: "
                   "[N, T, F])")
    p.add_argument("--pad", type=float, default=0.0, help="the value of the steps after the window "
                   "(default 0)")
    p.add_argument("--raw", action="store_true", help="tiles on the data's own scale (0..1), not each "
                   "stretched from its minimum to its maximum")
    p.add_argument("--columns", type=int, default=8, help="tiles per row of the grid")
    p.add_argument("--npz", help="also write the averages (images [K, L, F], mean, weights) to this .npz")
    p.add_argument("-o", required=True, help="where to write the grid (.png, .pdf, .svg, ...)")
    p.set_defaults(run=cmd_windows)

    p = sub.add_parser("demo", help="explain a bundled digit with a bundled model; write a heatmap")
    p.add_argument("--rules", default="lrp-epsilon")
    p.add_argument("--heatmap", default="rulegraph-demo.png")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("evaluate", help="faithfulness metrics and sanity checks of rule files on a batch")
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("--rules", required=True, help="rule files or bundled names, comma-separated "
                   "(lrp-epsilon,gradient); random attributions are added as the reference")
    p.add_argument("--output", help="the model output scored and explained (default: the first)")
    p.add_argument("--input", required=True, help=".npy or .npz batch, or image files, comma-separated; or a "
                   "dataset (a folder, a quoted glob, a .parquet file), evaluated batch by batch")
    p.add_argument("--target", default="argmax", help="argmax, or class indices (3 or 3,5)")
    p.add_argument("--batch-size", type=int, help="dataset: samples per batch (default 32); with a .npy/.npz "
                   "file, streams it as a dataset")
    p.add_argument("--limit", type=int, help="dataset: evaluate the first N samples only")
    p.add_argument("--column", help="dataset on a parquet file: the column of images (bytes) or tensors")
    p.add_argument("--quiet", action="store_true", help="dataset: no progress bar")
    _preprocess_options(p, bgr=True)
    p.add_argument("--metrics", help="metric families, comma-separated (default all): region, pixel, "
                   "deletion, road, correlation, random_logit, mprt")
    p.add_argument("--patch-size", type=int, default=8, help="region perturbation: patch side (default 8)")
    p.add_argument("--regions", type=int, default=100, help="region perturbation: regions removed (100)")
    p.add_argument("--step", type=int, default=1, help="pixel flipping: features per step (default 1)")
    p.add_argument("--baseline", default="black", help="value of removed features: black (the sample's "
                   "minimum), white (its maximum) or a number")
    p.add_argument("--seed", type=int, default=42, help="seed of the random draws (default 42)")
    p.add_argument("--logits", action="store_true", help="score the raw output, not its softmax")
    p.add_argument("--no-random", action="store_true", help="leave out the random-attribution reference")
    p.add_argument("--show", default="attribution", choices=("attribution", "saliency"),
                   help="evaluate the attribution (default) or the saliency a(x) of importance rule files")
    p.add_argument("--rank-by", help="the metric the ranking uses (default abpc)")
    p.add_argument("--json", help="write every per-sample value here (.json)")
    p.add_argument("--csv", help="write one line per method, sample and metric here (.csv)")
    p.add_argument("--plot", help="write the curves here (.png, .pdf, .svg)")
    p.set_defaults(run=cmd_evaluate)
    return parser


def _print_warning(command: str):
    """``warnings.showwarning`` for the CLI: a RulegraphWarning is one line on standard error."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RulegraphWarning):
            print(f"rulegraph {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def _quiet_stdout() -> None:
    """After a broken pipe: point standard output at /dev/null so the exit flush cannot fail again
    (what Python's signal documentation advises)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a descriptor (captured in tests)
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit codes are the module docstring's."""
    args = build_parser().parse_args(argv)
    where = f"rulegraph {args.command}"
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning(args.command)
            code = args.run(args)
            sys.stdout.flush()
        return code
    except RulegraphError as exc:
        print(f"{where}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("RULEGRAPH_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        print(f"{where}: internal error (a bug in rulegraph; please report it): {type(exc).__name__}: "
              f"{message} (run again with RULEGRAPH_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
