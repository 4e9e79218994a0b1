"""Pictures of attributions: heat maps, overlays, masked inputs, grids, 1-D plots and token colours.

The colour of a value: the map (after the channel reduction and the sign mode) is divided by the
``clip`` percentile of its |values| (numpy's ``np.percentile``, linear interpolation; default 99.5,
so a few outliers do not wash the rest out) and clipped to [-1, 1]; ``v`` then maps to RGB in [0, 1]
by ``colours``: white at 0, red ``(1, 1 − v, 1 − v)`` towards +1, blue ``(1 − |v|, 1 − |v|, 1)``
towards −1, so ``v`` and ``−v`` get mirrored colours (red and blue swapped). Modes:

- ``heatmap``: the colours alone;
- ``overlay``: ``input · (1 − w) + colour · w`` per pixel with ``w = ALPHA · |v|`` (zero shows the
  input itself, shown in grey or in colour);
- ``masked``: ``input · |v|`` (the input where the attribution is large, black elsewhere).

Each panel but a masked one has a colour bar in the attribution's own units, and a title.
Matplotlib is imported inside the functions (backend ``Agg``), so ``import rulegraph`` does not
load it.
"""

from __future__ import annotations

import html
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RulegraphError
from .lang.ruleset import RuleSet
from .run.files import check_output, write_with
from .run.inputs import read_image

#: extensions ``--heatmap`` may be written with (raster: matplotlib's, else converted by Pillow)
HEATMAP_SUFFIXES = (".png", ".bmp", ".gif", ".tif", ".tiff", ".jpg", ".jpeg", ".webp")
#: extensions a figure may be written with (compare, show)
FIGURE_SUFFIXES = HEATMAP_SUFFIXES + (".pdf", ".svg")
MATPLOTLIB_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", ".jpg": "jpeg", ".jpeg": "jpeg",
                      ".tif": "tiff", ".tiff": "tiff", ".webp": "webp"}
BAR_HEIGHT = 64
ALPHA = 0.8          # overlay: the heat map's weight at |v| = 1
DEFAULT_CLIP = 99.5
#: the bundled methods whose published picture is the map a(x) itself, not x ⊙ a(x)
SALIENCY_METHODS = ("gradient", "guided-backprop", "deconvnet", "smoothgrad")

SIGNS = {
    "all": lambda a: a,
    "positive": lambda a: np.maximum(a, 0.0),
    "negative": lambda a: np.minimum(a, 0.0),
    "absolute": np.abs,
}
REDUCTIONS = {
    "sum": lambda a: a.sum(axis=0),
    "maxabs": lambda a: np.take_along_axis(a, np.abs(a).argmax(axis=0)[None], axis=0)[0],
}
MODES = ("heatmap", "overlay", "masked")
BACKGROUNDS = ("grey", "colour")


def _choice(value: str, table, what: str) -> str:
    if value not in table:
        raise RulegraphError(f"unknown {what} '{value}'; use one of {', '.join(table)}")
    return value


def heatmap_suffixes() -> list[str]:
    """The extensions ``--heatmap`` may be written with."""
    return list(HEATMAP_SUFFIXES)


def colours(v: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> RGB in [0, 1]: white at 0, red towards +1, blue towards -1."""
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    return np.clip(np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1), 0, 1)



def colour_map():
    """``colours`` as a matplotlib colour map over [0, 1] (257 entries: 0.5 is exactly white)."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(colours(np.linspace(-1.0, 1.0, 257)), name="rulegraph")


# ---- numbers -> normalized maps -------------------------------------------------------------------

def reduce_channels(a: np.ndarray, reduce: str = "sum") -> np.ndarray:
    """[C, H, W] -> [H, W] by ``sum`` over C or ``maxabs`` (the value of largest |.| over C); [H, W] as is."""
    a = np.asarray(a, dtype=np.float64)
    _choice(reduce, REDUCTIONS, "channel reduction")
    if a.ndim == 3:
        return REDUCTIONS[reduce](a)
    if a.ndim == 2:
        return a
    raise RulegraphError(f"an image attribution is [C, H, W] or [H, W] per row; got {list(a.shape)}")


def normalize(a: np.ndarray, sign: str = "all",
              clip: float | None = DEFAULT_CLIP) -> tuple[np.ndarray, float]:
    """(v, scale): the map after the sign mode divided by the ``clip`` percentile of its |values|
    (``None`` or 100: the largest), clipped to [-1, 1]; an all-zero map gives v = 0, scale 0."""
    a = SIGNS[_choice(sign, SIGNS, "sign mode")](np.asarray(a, dtype=np.float64))
    if not np.isfinite(a).all():
        raise RulegraphError("the attribution holds NaN or infinite values; no picture is drawn")
    if clip is not None and not 0 < clip <= 100:
        raise RulegraphError(f"the clip percentile must be in (0, 100]; got {clip}")
    magnitude = np.abs(a)
    scale = float(np.percentile(magnitude, clip)) if clip is not None and a.size else 0.0
    if scale == 0.0 and a.size:
        scale = float(magnitude.max())
    if scale == 0.0:
        return np.zeros_like(a), 0.0
    return np.clip(a / scale, -1.0, 1.0), scale


def display_image(x: np.ndarray, bgr: bool = False) -> np.ndarray:
    """A model input [C, H, W] (C 1 or 3) or an image [H, W] / [H, W, 3] -> RGB [H, W, 3] in [0, 1]
    by min-max scaling per channel, which undoes a per-channel normalization (mean, std) up to each
    channel's range (channels reversed first when ``bgr``; a constant channel is 0)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(1, 2, 0)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3):
        raise RulegraphError(f"the input to draw under the map must be [C, H, W] or [H, W, C] with C 1 or 3; "
                             f"got {list(x.shape)}")
    if bgr:
        x = x[..., ::-1]
    lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    x = np.where(hi > lo, (x - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def grey(rgb: np.ndarray) -> np.ndarray:
    """Luminance (ITU-R BT.601 weights) repeated over three channels."""
    lum = rgb @ np.array([0.299, 0.587, 0.114])
    return np.repeat(lum[..., None], 3, axis=-1)


def compose(v: np.ndarray, mode: str = "heatmap", image: np.ndarray | None = None,
            background: str = "grey") -> np.ndarray:
    """The RGB [H, W, 3] picture of a normalized map ``v`` [H, W] (module docstring)."""
    _choice(mode, MODES, "mode")
    _choice(background, BACKGROUNDS, "background")
    heat = colours(v)
    if mode == "heatmap":
        return heat
    if image is None:
        raise RulegraphError(f"mode '{mode}' draws on the input: give the input image (--input)")
    if image.shape[:2] != v.shape:
        raise RulegraphError(f"the input is {image.shape[0]}x{image.shape[1]} pixels but the map "
                             f"{v.shape[0]}x{v.shape[1]}; they must match")
    if mode == "masked":
        return image * np.abs(v)[..., None]
    base = grey(image) if background == "grey" else image
    w = ALPHA * np.abs(v)[..., None]
    return base * (1 - w) + heat * w


# ---- labels, vocabularies -------------------------------------------------------------------------

def read_labels(path: str | Path) -> dict[int, str]:
    """A labels file: every line ``index,name`` (ImageNet's form), or one name per line (line k is
    class k - 1). A file mixing the forms, an empty line or a repeated index is refused by line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RulegraphError(f"labels file {path}: cannot read it ({exc})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    indexed = bool(lines) and lines[0].split(",", 1)[0].strip().isdigit() and "," in lines[0]
    labels: dict[int, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise RulegraphError(f"{path}:{number}: empty line; a labels file has one class per line")
        if not indexed:
            labels[number - 1] = line.strip()
            continue
        head, _, name = line.partition(",")
        if not head.strip().isdigit() or not name.strip():
            raise RulegraphError(f"{path}:{number}: expected 'index,name' like the first line; got '{line}'")
        if int(head) in labels:
            raise RulegraphError(f"{path}:{number}: class {int(head)} is already named on an earlier line")
        labels[int(head)] = name.strip()
    return labels


def read_vocab(path: str | Path) -> list[str]:
    """A vocabulary file, one token per line; the line number (from 0) is the token id (BERT's vocab.txt)."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RulegraphError(f"vocabulary file {path}: cannot read it ({exc})") from None


def tokens_of(ids, vocab: list[str]) -> list[str]:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    bad = [i for i in ids if not 0 <= i < len(vocab)]
    if bad:
        raise RulegraphError(f"token id {bad[0]} is outside the vocabulary ({len(vocab)} tokens)")
    return [vocab[i] for i in ids]


# ---- figures --------------------------------------------------------------------------------------

@dataclass
class Panel:
    """One picture of a grid: its RGB pixels, title and colour-bar range (``lo``..``hi``; no bar
    when ``bar`` is false: a masked input has no colour scale)."""

    rgb: np.ndarray
    title: str
    lo: float
    hi: float
    bar: bool = True


def image_panel(a: np.ndarray, image: np.ndarray | None = None, mode: str = "heatmap", sign: str = "all",
                clip: float | None = DEFAULT_CLIP, reduce: str = "sum", background: str = "grey",
                title: str = "") -> Panel:
    """The panel of one image attribution [C, H, W] or [H, W]."""
    v, scale = normalize(reduce_channels(a, reduce), sign, clip)
    lo = 0.0 if sign in ("positive", "absolute") else -scale
    hi = 0.0 if sign == "negative" else scale
    return Panel(compose(v, mode, image, background), title, lo, hi, bar=mode != "masked")


def figure(panels: list[list[Panel]], colorbar: bool = True, size: float = 3.2):
    """A matplotlib Figure with the panels as a grid (rows x columns), each with a title and a colour bar."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    rows, cols = len(panels), max(len(r) for r in panels)
    fig = Figure(figsize=(size * cols * (1.25 if colorbar else 1.0), size * rows + 0.3), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, row in enumerate(panels):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(row):
                continue
            p = row[c]
            ax.imshow(np.clip(p.rgb, 0, 1), interpolation="nearest")
            ax.set_title(p.title, fontsize=8)
            if colorbar and p.bar:
                top = max(abs(p.lo), abs(p.hi)) or 1.0  # the map is symmetric: -top is blue, +top red
                mappable = ScalarMappable(Normalize(-top, top), colour_map())
                bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02)
                bar.ax.set_ylim(p.lo if p.lo < p.hi else -top, p.hi if p.lo < p.hi else top)
                bar.ax.tick_params(labelsize=6)
    return fig


def plot_1d(a: np.ndarray, signal: np.ndarray | None = None, kind: str = "auto", title: str = ""):
    """A Figure of a 1-D attribution [F] or [T]: bars (tabular; ``auto`` for F ≤ 64) or a line
    (time series, audio), red where positive, blue where negative; ``signal`` is drawn above it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    a = np.asarray(a, dtype=np.float64).reshape(-1)
    if not np.isfinite(a).all():
        raise RulegraphError("the attribution holds NaN or infinite values; no picture is drawn")
    if kind == "auto":
        kind = "bar" if a.size <= 64 else "line"
    _choice(kind, ("bar", "line"), "plot kind")
    red, blue = colours(np.array([1.0]))[0], colours(np.array([-1.0]))[0]
    fig = Figure(figsize=(max(4.0, min(12.0, 0.3 * a.size)) if kind == "bar" else 8.0,
                          4.5 if signal is not None else 3.0), layout="constrained")
    axes = fig.subplots(2 if signal is not None else 1, 1, squeeze=False, sharex=True)[:, 0]
    if signal is not None:
        axes[0].plot(np.arange(a.size), np.asarray(signal, dtype=np.float64).reshape(-1), color="0.3", lw=0.8)
        axes[0].set_ylabel("input")
    ax = axes[-1]
    t = np.arange(a.size)
    if kind == "bar":
        ax.bar(t, a, color=[red if v >= 0 else blue for v in a])
    else:
        ax.plot(t, a, color="0.5", lw=0.5)
        ax.fill_between(t, a, 0, where=a >= 0, color=red, interpolate=True)
        ax.fill_between(t, a, 0, where=a < 0, color=blue, interpolate=True)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("attribution")
    axes[0].set_title(title, fontsize=9)
    return fig


def save_figure(fig, path: str | Path, inputs=(), what: str = "--heatmap", dpi: int = 100) -> Path:
    """Write ``fig`` atomically (``files.write_with``) after ``files.check_output``; formats
    matplotlib lacks (.bmp, .gif) go through a PNG and Pillow."""
    path = check_output(path, inputs, FIGURE_SUFFIXES, what)
    fmt = MATPLOTLIB_FORMATS.get(path.suffix.lower())

    def write(tmp: Path) -> None:
        if fmt is not None:
            fig.savefig(tmp, dpi=dpi, format=fmt)
            return
        import io

        from PIL import Image

        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=dpi, format="png")
        buffer.seek(0)
        Image.open(buffer).convert("RGB").save(tmp, format=Image.registered_extensions()[path.suffix.lower()])

    return write_with(path, write, what)


# ---- titles and rows ------------------------------------------------------------------------------

def title_of(cls=None, labels: dict[int, str] | None = None, method: str = "",
             delta: float | None = None) -> str:
    """``tabby, tabby cat (281) · lrp-epsilon · Δ 1.2e-06`` (the parts that are known)."""
    parts = []
    if cls is not None:
        name = (labels or {}).get(int(cls))
        parts.append(f"{name.split(',')[0]} ({int(cls)})" if name else f"class {int(cls)}")
    if method:
        parts.append(method)
    if delta is not None:
        parts.append(f"Δ {delta:.2g}")
    return " · ".join(parts)


def method_name(rules) -> str:
    """A rule file's name as a method name: ``lrp-epsilon`` for ``rules/lrp-epsilon.rules``."""
    if isinstance(rules, RuleSet):
        return Path(rules.source).stem
    return Path(str(rules)).stem


def default_show(ruleset, method: str) -> str:
    """``saliency`` for the importance files of ``SALIENCY_METHODS`` (their papers draw a(x)),
    else ``attribution``."""
    return "saliency" if ruleset.quantity == "importance" and method in SALIENCY_METHODS else "attribution"


def choose_maps(result, method: str, show: str | None = None) -> tuple[np.ndarray, str]:
    """(maps, show): the attribution (``show='attribution'``) or the saliency a(x) of the first input;
    ``None`` takes saliency for the ``SALIENCY_METHODS`` when the result has one."""
    show = show or ("saliency" if method in SALIENCY_METHODS and result.saliency else "attribution")
    _choice(show, ("attribution", "saliency"), "--show choice")
    if show == "attribution":
        return result.map, show
    if not result.saliency:
        raise RulegraphError(f"--show saliency needs a rule file whose quantity is importance (it gives "
                             f"a(x)); "
                             f"{method or 'this one'} gives no saliency")
    return next(iter(result.saliency.values())), show


#: show -> (sign, reduce) by default: a saliency map is drawn as Simonyan et al. do, max |a| over
#: channels; an attribution signed and summed over channels
SHOW_DEFAULTS = {"saliency": ("absolute", "maxabs"), "attribution": ("all", "sum")}


def show_defaults(show: str, sign: str | None, reduce: str | None) -> tuple[str, str]:
    """(sign, reduce) with ``SHOW_DEFAULTS[show]`` filling the ones not given."""
    default_sign, default_reduce = SHOW_DEFAULTS[show]
    return sign or default_sign, reduce or default_reduce


def row_panels(maps: np.ndarray, images=None, titles=None, **options) -> list[Panel]:
    """One panel per batch row of ``maps`` [N, C, H, W] or [N, H, W]."""
    maps = np.asarray(maps)
    if maps.ndim not in (3, 4):
        raise RulegraphError(f"image attributions are [N, C, H, W] or [N, H, W]; got {list(maps.shape)}")
    return [image_panel(maps[i], None if images is None else images[i],
                        title="" if titles is None else titles[i], **options) for i in range(len(maps))]


def is_image(maps: np.ndarray) -> bool:
    """Whether a batched map [N, ...] is drawn as an image (two or three axes per row)."""
    return np.ndim(maps) in (3, 4)


def render_array(maps: np.ndarray, images=None, mode: str = "heatmap", sign: str = "all",
                 clip: float | None = DEFAULT_CLIP, reduce: str = "sum", background: str = "grey",
                 titles=None, signals=None, kind: str = "auto", path=None, inputs=()):
    """The Figure of a batched attribution ``maps`` [N, ...]: one row of panels per batch row for
    images ([N, C, H, W], [N, H, W]); a 1-D plot per row for [N, F] / [N, T] (rows stacked).
    ``images``: RGB [N, H, W, 3] in [0, 1] to draw on (``display_image``). Written to ``path`` if given."""
    maps = np.asarray(maps)
    if is_image(maps):
        panels = row_panels(maps, images, titles, mode=mode, sign=sign, clip=clip, reduce=reduce,
                            background=background)
        fig = figure([[p] for p in panels])
    elif maps.ndim in (1, 2):
        rows = maps.reshape(len(maps), -1) if maps.ndim == 2 else maps.reshape(1, -1)
        if len(rows) > 1:
            fig = plot_grid_1d(rows, signals, kind, titles)
        else:
            fig = plot_1d(rows[0], None if signals is None else signals[0], kind,
                          "" if titles is None else titles[0])
    else:
        raise RulegraphError(f"a picture needs an attribution shaped [N, C, H, W], [N, H, W] or [N, F]; "
                             f"this one is {list(maps.shape)}: plot it yourself from the .npy")
    if path is not None:
        save_figure(fig, path, inputs)
    return fig


def plot_grid_1d(rows, signals, kind, titles):
    """Several 1-D rows stacked, one panel each (``plot_1d``'s bars or fills; the signal on a second axis)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 3.0 * len(rows)), layout="constrained")
    subs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    red, blue = colours(np.array([1.0]))[0], colours(np.array([-1.0]))[0]
    for i, (sub, a) in enumerate(zip(subs, rows)):
        ax = sub.subplots()
        t = np.arange(a.size)
        use_bar = (a.size <= 64) if kind == "auto" else kind == "bar"
        if use_bar:
            ax.bar(t, a, color=[red if v >= 0 else blue for v in a])
        else:
            ax.fill_between(t, a, 0, where=a >= 0, color=red, interpolate=True)
            ax.fill_between(t, a, 0, where=a < 0, color=blue, interpolate=True)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title("" if titles is None else titles[i], fontsize=9)
        if signals is not None:  # the input on its own axis, in grey
            ax.twinx().plot(t, np.asarray(signals[i], dtype=np.float64).reshape(-1), color="0.3", lw=0.8)
    return fig


def render(result, x=None, mode: str | None = None, sign: str | None = None,
           clip: float | None = DEFAULT_CLIP, reduce: str | None = None, background: str = "grey",
           labels=None, method: str = "", show: str | None = None, bgr: bool = False, path=None, inputs=()):
    """The Figure of an ``Explainer.explain`` result: one panel per batch row, titled with the class
    (named from ``labels``, a dict or a labels file), the method and the conservation delta.
    ``x``: the input explained (drawn under ``overlay`` / ``masked``; ``bgr``: its channels are BGR).
    ``show``: ``attribution`` (x ⊙ a(x) for importance files) or ``saliency`` (a(x)); default: saliency
    for the gradient-type files named in ``SALIENCY_METHODS``, given as ``method``. ``None`` options
    take ``show_defaults`` (sign, reduce) and ``overlay`` when ``x`` is given, else ``heatmap``."""
    maps, show = choose_maps(result, method, show)
    sign, reduce = show_defaults(show, sign, reduce)
    mode = mode or ("overlay" if x is not None else "heatmap")
    if labels is not None and not isinstance(labels, dict):
        labels = read_labels(labels)
    n = len(maps)
    titles = [title_of(None if result.target is None else result.target[i], labels,
                       method + (" (saliency)" if show == "saliency" else ""),
                       None if show == "saliency" else float(result.delta[i]))
              for i in range(n)]
    images = None
    if x is not None and is_image(maps):
        xs = np.asarray(x)
        images = [display_image(xs[i], bgr) for i in range(n)]
    elif mode != "heatmap" and is_image(maps):
        mode = _choice(mode, MODES, "mode")
        raise RulegraphError(f"mode '{mode}' draws on the input: give it (x=, --input)")
    signals = np.asarray(x).reshape(n, -1) if x is not None and not is_image(maps) else None
    return render_array(maps, images, mode, sign, clip, reduce, background, titles, signals, path=path,
                        inputs=inputs)


# ---- tokens ---------------------------------------------------------------------------------------

def tokens_html(relevance, tokens: list[str], clip: float | None = DEFAULT_CLIP, sign: str = "all") -> str:
    """An HTML fragment: one ``<span>`` per token with the token's colour (``colours``) as background."""
    v, _ = normalize(np.asarray(relevance, dtype=np.float64).reshape(-1), sign, clip)
    if len(v) != len(tokens):
        raise RulegraphError(f"{len(v)} relevance values for {len(tokens)} tokens; they must match")
    spans = []
    for value, token, rgb in zip(np.asarray(relevance).reshape(-1), tokens, colours(v)):
        r, g, b = (int(round(c * 255)) for c in rgb)
        spans.append(f'<span style="background-color: rgb({r}, {g}, {b})" title="{float(value):.4g}">'
                     f"{html.escape(token)}</span>")
    return '<p style="font-family: monospace; line-height: 1.8">' + " ".join(spans) + "</p>\n"


def tokens_page(rows: list[tuple[str, np.ndarray, list[str]]], clip: float | None = DEFAULT_CLIP,
                sign: str = "all") -> str:
    """A whole HTML page: per (title, relevance, tokens) row a heading and ``tokens_html``."""
    body = "".join(f"<h3>{html.escape(title)}</h3>\n" + tokens_html(r, tokens, clip, sign)
                   for title, r, tokens in rows)
    return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n{body}</body></html>\n'


def use_colour(stream=None) -> bool:
    """ANSI colour on ``stream`` (default standard output): a terminal and no NO_COLOR variable."""
    stream = stream or sys.stdout
    return "NO_COLOR" not in os.environ and hasattr(stream, "isatty") and stream.isatty()


def tokens_ansi(relevance, tokens: list[str], colour: bool | None = None, clip: float | None = DEFAULT_CLIP,
                sign: str = "all") -> str:
    """The tokens as one line of text; with ``colour`` (default ``use_colour()``) each has a 24-bit
    ANSI background (``ESC[48;2;R;G;Bm``, black text) in its colour; plain text otherwise."""
    v, _ = normalize(np.asarray(relevance, dtype=np.float64).reshape(-1), sign, clip)
    if len(v) != len(tokens):
        raise RulegraphError(f"{len(v)} relevance values for {len(tokens)} tokens; they must match")
    if not (use_colour() if colour is None else colour):
        return " ".join(tokens)
    out = []
    for token, rgb in zip(tokens, colours(v)):
        r, g, b = (int(round(c * 255)) for c in rgb)
        out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{token}\x1b[0m")
    return " ".join(out)


# ---- the previous Pillow-only pictures (kept for the API) ------------------------------------------

def heatmap_rgb(attribution: np.ndarray) -> np.ndarray:
    """[H, W] (or [C, H, W], summed over C) -> uint8 [H, W, 3], scaled by the largest |value|."""
    a = np.asarray(attribution, dtype=np.float64)
    if a.ndim == 3:
        a = a.sum(axis=0)
    if a.ndim < 2:
        return bars_rgb(a.reshape(-1))
    v, _ = normalize(a, "all", None)
    return (colours(v) * 255).round().astype(np.uint8)


def bars_rgb(values: np.ndarray, height: int = BAR_HEIGHT) -> np.ndarray:
    """One bar per value, uint8 [height, F, 3]: a value v fills ``round(|v| / max|v| · height/2)``
    pixels up (v > 0) or down (v < 0) from the middle; the bar's colour is the heatmap's."""
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        raise RulegraphError("the attribution holds NaN or infinite values; no heatmap is drawn")
    scale = np.abs(v).max() if v.size else 0.0
    v = v / (scale or 1.0)
    half = height // 2
    fill = np.round(np.abs(v) * half).astype(int)
    rows = np.arange(height)[:, None]
    up = (rows < half) & (rows >= half - fill) & (v > 0)
    down = (rows >= half) & (rows < half + fill) & (v < 0)
    rgb = np.ones((height, len(v), 3))
    rgb[up | down] = np.broadcast_to(colours(v), (height, len(v), 3))[up | down]
    return (rgb * 255).round().astype(np.uint8)


def save_heatmap(attribution: np.ndarray, path: str | Path, inputs=()) -> Path:
    """The heat map of one sample's attribution (``render_array`` of one row), written to ``path``."""
    fig = render_array(np.asarray(attribution)[None], path=None)
    return save_figure(fig, path, inputs)


def load_image(path: str | Path, shape: list, scale: float = 1.0) -> np.ndarray:
    """An image file as a float32 [1, C, H, W] array in [0, scale] (``inputs.read_image``)."""
    return read_image(path, shape, scale)


# ---- evaluation curves ----------------------------------------------------------------------------

#: curve name -> (panel title, y label); the x axis is the fraction of the steps taken
CURVE_PANELS = {
    "region_morf": ("region perturbation, MoRF", "f(x) − f(x perturbed)"),
    "region_lerf": ("region perturbation, LeRF", "f(x) − f(x perturbed)"),
    "pixel_morf": ("pixel flipping, MoRF", "class score"),
    "pixel_lerf": ("pixel flipping, LeRF", "class score"),
    "deletion": ("deletion", "class score"),
    "insertion": ("insertion", "class score"),
    "road_morf": ("ROAD, MoRF imputed", "accuracy"),
    "road_lerf": ("ROAD, LeRF imputed", "accuracy"),
}


def plot_evaluation(evaluation, columns: int = 3):
    """A Figure of an ``Evaluation``: one panel per curve (the mean over the samples, shaded ± one
    standard error, one line per method) and the MPRT cascade (Spearman per randomized layer)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    names = [c for c in CURVE_PANELS if any(c in curves for curves in evaluation.curves.values())]
    panels = len(names) + bool(evaluation.layers)
    if not panels:
        raise RulegraphError("the evaluation holds no curves to plot (measure region, pixel, deletion, "
                             "road or mprt)")
    rows = -(-panels // columns)
    fig = Figure(figsize=(4.2 * min(columns, panels), 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, min(columns, panels), squeeze=False).reshape(-1)
    for ax, name in zip(axes, names):
        for method in evaluation.methods:
            curve = evaluation.curves[method].get(name)
            if curve is None:
                continue
            t = np.linspace(0, 1, curve.shape[1])
            mean = curve.mean(axis=0)
            sem = curve.std(axis=0, ddof=1) / np.sqrt(len(curve)) if len(curve) > 1 else 0 * mean
            ax.plot(t, mean, label=method, lw=1.2)
            ax.fill_between(t, mean - sem, mean + sem, alpha=0.2)
        ax.set_title(CURVE_PANELS[name][0], fontsize=9)
        ax.set_xlabel("fraction perturbed", fontsize=8)
        ax.set_ylabel(CURVE_PANELS[name][1], fontsize=8)
    if evaluation.layers:
        ax = axes[len(names)]
        for method, steps in evaluation.layers.items():
            values = np.array([v for _, v in steps])
            ax.errorbar(np.arange(len(steps)), np.nanmean(values, axis=1),
                        yerr=np.nanstd(values, axis=1), label=method, lw=1.2, capsize=2)
        labels = [name.rsplit("/", 1)[-1] if name != "original" else name for name, _ in next(iter(
            evaluation.layers.values()))]
        ax.set_xticks(np.arange(len(labels)), labels, rotation=60, ha="right", fontsize=6)
        ax.set_title("MPRT: layers randomized from the top", fontsize=9)
        ax.set_ylabel("Spearman with the original |map|", fontsize=8)
        ax.axhline(0, color="black", lw=0.5)
    for ax in axes[panels:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    return fig


def image_tiles(images: np.ndarray, titles: list[str], path: str | Path, inputs=(), columns: int = 8,
                what: str = "-o") -> Path:
    """Images [N, C, H, W] in [0, 1] (C 1 or 3) as a titled grid, ``columns`` tiles a row, no colour bars."""
    tiles = [Panel(np.repeat(np.clip(img, 0, 1).transpose(1, 2, 0), 3 // img.shape[0], axis=-1), title,
                   0.0, 0.0, bar=False) for img, title in zip(images, titles)]
    rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    return save_figure(figure(rows, colorbar=False, size=2.0), path, inputs, what)


# ---- unit and representation views (run/units.py, run/representation.py) ---------------------------

def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _tile(crop: np.ndarray, bgr: bool = False) -> np.ndarray:
    """An input crop [C, ...] as RGB: an image crop by ``display_image`` (min-max per channel over the
    crop), a 1-D sample [F] or [C, T] as one grey row."""
    crop = np.asarray(crop, dtype=np.float64)
    if crop.ndim == 3 and crop.shape[0] in (1, 3) and crop.shape[1] and crop.shape[2]:
        return display_image(crop, bgr)
    return display_image(crop.reshape(-1, crop.shape[-1]) if crop.ndim else crop.reshape(1, 1), False)


def unit_examples_figure(examples, bgr: bool = False, size: float = 1.1):
    """One row per unit, its k examples as tiles (the input at the receptive field of the max, or the
    whole input) titled with the activation; the row starts with the unit's name."""
    units, k = examples.values.shape
    fig = _figure(size * k + 1.0, size * units + 0.5)
    axes = fig.subplots(units, k, squeeze=False)
    for u in range(units):
        for r in range(k):
            ax = axes[u][r]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            ax.imshow(_tile(examples.crops[u][r], bgr), interpolation="nearest")
            ax.set_title(f"{examples.values[u, r]:.3g}", fontsize=7, pad=2)
            if r == 0:
                ax.set_ylabel(f"unit {examples.units[u]}", fontsize=8)
    where = examples.field.text() if examples.field.axes is not None else (
        "whole inputs: receptive field " + examples.field.text().split(":")[0])
    fig.suptitle(f"top {k} of {examples.samples} samples per unit of '{examples.layer}' ({where})",
                 fontsize=8)
    return fig


def class_names(classes, labels: dict[int, str] | None = None) -> list[str]:
    """A legend name per class: the labels file's name, else the number."""
    return [labels.get(int(c), str(c)) if labels else str(c) for c in classes]


def embedding_figure(embedding: np.ndarray, classes: np.ndarray, title: str,
                     labels: dict[int, str] | None = None, size: float = 6.0):
    """A scatter plot of 2-D points coloured by class (tab10/tab20, a legend entry per class)."""
    import matplotlib

    embedding = np.asarray(embedding, dtype=np.float64)
    found = np.unique(classes)
    cmap = matplotlib.colormaps["tab10" if len(found) <= 10 else "tab20"]
    fig = _figure(size + 1.4, size)
    ax = fig.subplots()
    for i, (c, name) in enumerate(zip(found, class_names(found, labels))):
        chosen = classes == c
        ax.scatter(embedding[chosen, 0], embedding[chosen, 1], s=6, color=cmap(i % cmap.N), label=name,
                   linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=3, frameon=False)
    return fig


def unit_grid_figure(grid, labels: dict[int, str] | None = None, size: float = 1.6):
    """One small heat map per class of the unit grid (``representation.UnitGrid``), one colour scale
    for all (viridis; empty cells white), with a colour bar."""
    import matplotlib

    maps = grid.maps()
    count = len(maps)
    columns = min(count, 5)
    rows = -(-count // columns)
    fig = _figure(size * columns * 1.15 + 0.6, size * rows + 0.6)
    axes = fig.subplots(rows, columns, squeeze=False)
    lo, hi = float(np.nanmin(maps)), float(np.nanmax(maps))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = None
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i >= count:
            continue
        image = ax.imshow(maps[i], cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1,
                          interpolation="nearest")
        name = class_names([grid.classes[i]], labels)[0]
        ax.set_title(f"{grid.by} {name} ({grid.counts[i]})", fontsize=8)
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("mean activation", fontsize=8)
    rows_, cols_ = grid.cells.shape
    fig.suptitle(f"units of '{grid.layer}' on a {rows_}x{cols_} grid (ordered by the first principal "
                 f"component of their class means), mean per {grid.by}", fontsize=8)
    return fig


def concept_panels(full: np.ndarray, maps: np.ndarray, channels, clip: float | None = DEFAULT_CLIP,
                   reduce: str = "sum") -> list[Panel]:
    """One input row's CRP panels: the full map on its own colour scale, then one per channel, all
    channels on one scale (the ``clip`` percentile of |values| over all of them, colour bar on the
    last), so the channels compare with each other; each title gives the map's sum."""
    full2 = reduce_channels(full, reduce)
    v, scale = normalize(full2, "all", clip)
    panels = [Panel(colours(v), f"full map\nsum {full2.sum():.3g}", -scale, scale)]
    shares = np.stack([reduce_channels(m, reduce) for m in maps])
    _, common = normalize(shares, "all", clip)
    common = common or 1.0
    for i, (c, m2) in enumerate(zip(channels, shares)):
        panels.append(Panel(colours(np.clip(m2 / common, -1, 1)), f"channel {c}\nsum {m2.sum():.3g}", -common,
                            common, bar=i == len(shares) - 1))
    return panels


def window_grid(tiles: np.ndarray, titles: list[str], path: str | Path, inputs=(), columns: int = 8,
                title: str = "", what: str = "-o") -> Path:
    """Grey tiles [K, 1, L, F] in [0, 1] (``run/windows.py``: one averaged window per unit) as a grid,
    ``columns`` a row, each tile drawn at its own aspect (L steps high, F wide)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    k, _, steps, width = tiles.shape
    rows = -(-k // columns)
    tile_w = 1.4
    tile_h = tile_w * steps / width + 0.22
    fig = Figure(figsize=(tile_w * columns, tile_h * rows + (0.35 if title else 0.05)), layout="constrained")
    if title:
        fig.suptitle(title, fontsize=9)
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < k:
            ax.imshow(tiles[i, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
            ax.set_title(titles[i], fontsize=7)
    return save_figure(fig, path, inputs, what)
