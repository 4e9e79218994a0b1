"""Pictures (rulegraph/viz.py): pixel-level oracles for the colour map, clipping, sign modes, overlay
and masked modes; matplotlib artist checks for colour bars and titles; token HTML / ANSI; the CLI
``explain --heatmap``, ``compare`` and ``show``; bad inputs exit 2 with a message naming the place."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rulegraph import Explainer, viz
from rulegraph.cli import main
from rulegraph.errors import RulegraphError

ROOT = Path(__file__).resolve().parent.parent
CNN = str(ROOT / "models" / "digits_cnn.onnx")
SAMPLE = ROOT / "models" / "digits_sample.npz"
SHARED = ROOT.parent / "shared" / "models"
WHITE = np.ones(3)
RNG = np.random.default_rng(11)


# ---- colours --------------------------------------------------------------------------------------

def test_zero_is_the_neutral_colour():
    np.testing.assert_array_equal(viz.colours(np.zeros(4)), np.ones((4, 3)))
    v, _ = viz.normalize(np.array([[0.0, 2.0], [-1.0, 0.0]]))
    np.testing.assert_array_equal(viz.compose(v)[0, 0], WHITE)
    cmap = viz.colour_map()
    np.testing.assert_array_equal(cmap(0.5)[:3], WHITE)  # the colour bar's middle is white too


@pytest.mark.parametrize("v,red", [(1.0, (1, 0, 0)), (0.5, (1, 0.5, 0.5)), (0.25, (1, 0.75, 0.75))])
def test_v_and_minus_v_get_mirrored_colours(v, red):
    """+v: (1, 1 − v, 1 − v); −v: the same with red and blue swapped."""
    np.testing.assert_allclose(viz.colours(np.array(v)), red)
    np.testing.assert_allclose(viz.colours(np.array(-v)), red[::-1])


@pytest.mark.parametrize("clip", [99.5, 90.0, 50.0, 100.0])
def test_clipping_at_the_numpy_percentile(clip):
    a = RNG.standard_normal((20, 30)) ** 3
    v, scale = viz.normalize(a, clip=clip)
    assert scale == np.percentile(np.abs(a), clip)
    over = np.abs(a) >= scale
    np.testing.assert_array_equal(np.abs(v[over]), 1.0)          # above the percentile: saturated
    np.testing.assert_allclose(v[~over], a[~over] / scale)        # below: linear
    rgb = viz.compose(v)
    assert np.all(rgb[a >= scale] == (1, 0, 0)) and np.all(rgb[a <= -scale] == (0, 0, 1))


@pytest.mark.parametrize("sign,expected", [
    ("all", [-2.0, -1.0, 0.0, 1.0, 2.0]), ("positive", [0, 0, 0, 1.0, 2.0]),
    ("negative", [-2.0, -1.0, 0, 0, 0]), ("absolute", [2.0, 1.0, 0.0, 1.0, 2.0])])
def test_sign_modes_zero_out_the_other_sign(sign, expected):
    v, scale = viz.normalize(np.array([-2.0, -1.0, 0.0, 1.0, 2.0]), sign=sign, clip=None)
    assert scale == 2.0
    np.testing.assert_array_equal(v, np.array(expected) / 2.0)


@pytest.mark.parametrize("reduce,expected", [("sum", [[0.5, -1.0]]), ("maxabs", [[-3.0, -2.0]])])
def test_channel_reduction(reduce, expected):
    a = np.array([[[1.0, 1.0]], [[-3.0, -2.0]], [[2.5, 0.0]]])  # [C=3, H=1, W=2]
    np.testing.assert_array_equal(viz.reduce_channels(a, reduce), expected)


def test_overlay_is_the_documented_blend():
    image = RNG.uniform(size=(4, 5, 3))
    v = RNG.uniform(-1, 1, size=(4, 5))
    for background, base in (("grey", viz.grey(image)), ("colour", image)):
        out = viz.compose(v, "overlay", image, background)
        for y, x in [(0, 0), (1, 3), (3, 4)]:
            w = viz.ALPHA * abs(v[y, x])
            np.testing.assert_allclose(out[y, x], base[y, x] * (1 - w) + viz.colours(v[y, x]) * w)
    lum = 0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]
    np.testing.assert_allclose(viz.grey(image)[..., 1], lum)
    np.testing.assert_allclose(viz.compose(np.zeros((4, 5)), "overlay", image, "colour"), image)


def test_masked_is_input_times_normalized_abs():
    image = RNG.uniform(size=(3, 3, 3))
    a = np.array([[4.0, -2.0, 0.0], [1.0, -4.0, 2.0], [0.0, 0.0, 3.0]])
    v, _ = viz.normalize(a, clip=None)
    np.testing.assert_allclose(viz.compose(v, "masked", image), image * (np.abs(a) / 4.0)[..., None])


def test_display_image_reverses_bgr_and_scales_to_unit_range():
    """Per channel: (x − min) / (max − min), so a per-channel mean and std are undone; BGR reversed."""
    rgb = RNG.uniform(0, 255, size=(5, 4, 3))
    rgb[0, 0], rgb[1, 1] = 0.0, 255.0
    normalized = (rgb - np.array([123.7, 116.3, 103.5])) / np.array([58.4, 57.1, 57.4])
    np.testing.assert_allclose(viz.display_image(normalized.transpose(2, 0, 1)), rgb / 255)
    np.testing.assert_allclose(viz.display_image(normalized[..., ::-1], bgr=True), rgb / 255)
    np.testing.assert_array_equal(viz.display_image(np.full((1, 2, 2), 7.0)), np.zeros((2, 2, 3)))


# ---- figures: colour bars and titles -------------------------------------------------------------

def test_figure_has_image_colour_bar_and_title():
    a = RNG.standard_normal((2, 3, 6, 6))
    fig = viz.render_array(a, titles=["first", "second"], clip=90.0)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 2 and len(fig.axes) == 4  # one colour bar per panel
    for i, ax in enumerate(images):
        assert ax.get_title() == ["first", "second"][i]
        v, scale = viz.normalize(a[i].sum(axis=0), clip=90.0)
        np.testing.assert_allclose(ax.images[0].get_array(), viz.colours(v))
        bar = next(other for other in fig.axes if other is not ax and other.get_label() == "<colorbar>"
                   and getattr(other, "_colorbar", None) is not None and other._colorbar.mappable.norm.vmax
                   == pytest.approx(scale) and other not in images)
        assert bar.get_ylim() == pytest.approx((-scale, scale))


@pytest.mark.parametrize("mode,bars", [("heatmap", 1), ("overlay", 1), ("masked", 0)])
def test_colour_bar_except_on_a_masked_input(mode, bars):
    fig = viz.figure([[viz.image_panel(RNG.standard_normal((4, 4)), RNG.uniform(size=(4, 4, 3)), mode)]])
    assert len(fig.axes) == 1 + bars


def test_title_names_class_method_and_delta(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("0,zero\n1,one, the first\n")
    title = viz.title_of(1, viz.read_labels(labels), "lrp-epsilon", 2.5e-6)
    assert title == "one (1) · lrp-epsilon · Δ 2.5e-06"
    assert viz.title_of(7, None, "", None) == "class 7"


@pytest.mark.parametrize("text,expected", [
    ("0,cat\n1,dog\n", {0: "cat", 1: "dog"}), ("cat\ndog\n\n", {0: "cat", 1: "dog"}),
    ("5,tabby, tabby cat\n", {5: "tabby, tabby cat"})])
def test_labels_files(tmp_path, text, expected):
    path = tmp_path / "labels.txt"
    path.write_text(text)
    assert viz.read_labels(path) == expected


@pytest.mark.parametrize("text,message", [
    ("0,cat\ndog\n", r"labels.txt:2: expected 'index,name' like the first line; got 'dog'"),
    ("cat\n\ndog\n", r"labels.txt:2: empty line"),
    ("0,cat\n0,dog\n", r"labels.txt:2: class 0 is already named")])
def test_bad_labels_files(tmp_path, text, message):
    path = tmp_path / "labels.txt"
    path.write_text(text)
    with pytest.raises(RulegraphError, match=re.escape(message) if "'" in message else message):
        viz.read_labels(path)


def test_1d_bars_have_the_values_and_sign_colours():
    a = np.array([1.0, -0.5, 0.0, 2.0])
    fig = viz.plot_1d(a, kind="bar")
    bars = fig.axes[0].patches
    np.testing.assert_allclose([b.get_height() for b in bars], a)
    red, blue = viz.colours(np.array([1.0, -1.0]))
    for b, value in zip(bars, a):
        np.testing.assert_allclose(b.get_facecolor()[:3], red if value >= 0 else blue)


def test_1d_line_plot_of_a_time_series_with_its_signal():
    t = np.linspace(0, 6, 200)
    fig = viz.plot_1d(np.sin(t), signal=np.cos(t))
    assert len(fig.axes) == 2 and len(fig.axes[1].collections) == 2  # positive and negative fills
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), np.cos(t))


# ---- tokens ---------------------------------------------------------------------------------------

def test_html_has_one_span_per_token_with_its_colour():
    html = viz.tokens_html([2.0, -1.0, 0.0, 1.0], ["the", "<b>", "cat", "sat"], clip=None)
    pattern = r'<span style="background-color: rgb\((\d+), (\d+), (\d+)\)"[^>]*>([^<]*)</span>'
    spans = re.findall(pattern, html)
    assert [s[3] for s in spans] == ["the", "&lt;b&gt;", "cat", "sat"]
    expected = [(255, 0, 0), (128, 128, 255), (255, 255, 255), (255, 128, 128)]  # round(0.5 * 255) = 128
    assert [tuple(int(c) for c in s[:3]) for s in spans] == expected


def test_ansi_codes_only_when_asked(monkeypatch):
    coloured = viz.tokens_ansi([1.0, -1.0], ["a", "b"], colour=True, clip=None)
    assert "\x1b[48;2;255;0;0m" in coloured and "\x1b[48;2;0;0;255m" in coloured
    assert viz.tokens_ansi([1.0, -1.0], ["a", "b"], colour=False) == "a b"
    monkeypatch.setenv("NO_COLOR", "1")
    assert viz.tokens_ansi([1.0, -1.0], ["a", "b"]) == "a b"


def test_vocabulary_ids_to_tokens(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\nhello\nworld\n")
    assert viz.tokens_of(np.array([1, 2, 0]), viz.read_vocab(vocab)) == ["hello", "world", "[PAD]"]
    with pytest.raises(RulegraphError, match="token id 3 is outside the vocabulary"):
        viz.tokens_of([3], viz.read_vocab(vocab))


# ---- the explainer's pictures ---------------------------------------------------------------------

def digits():
    return np.load(SAMPLE)[np.load(SAMPLE).files[0]][:3]


@pytest.mark.parametrize("rules,show,field", [
    ("gradient", None, "saliency"), ("gradient", "attribution", "attribution"),
    ("gradient-x-input", None, "attribution"), ("lrp-epsilon", None, "attribution")])
def test_default_show_is_saliency_for_the_gradient_file(rules, show, field):
    """A saliency map is drawn as max |a| over channels (Simonyan et al.); an attribution signed, summed."""
    x = digits()
    result = Explainer(CNN, rules).explain(x)
    fig = viz.render(result, x=x, mode="heatmap", method=rules, show=show)
    maps = next(iter(result.saliency.values())) if field == "saliency" else result.map
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(x)  # one row per batch item
    sign, reduce = {"saliency": ("absolute", "maxabs"), "attribution": ("all", "sum")}[field]
    for i, ax in enumerate(panels):
        v, _ = viz.normalize(viz.reduce_channels(maps[i], reduce), sign)
        np.testing.assert_allclose(ax.images[0].get_array(), viz.colours(v))
        assert ("saliency" in ax.get_title()) == (field == "saliency")


def test_cli_compare_and_show_write_pngs(tmp_path, capsys):
    grid, out, png = tmp_path / "grid.png", tmp_path / "r.npy", tmp_path / "shown.png"
    np.save(tmp_path / "one.npy", digits()[:1])
    assert main(["compare", CNN, "--rules", "lrp-epsilon,gradient", "--input", str(tmp_path / "one.npy"),
                 "-o", str(grid)]) == 0
    assert Image.open(grid).size[0] > 1.5 * Image.open(grid).size[1]  # two columns, one row
    assert main(["explain", CNN, "--rules", "lrp-epsilon", "--input", str(SAMPLE), "--out", str(out)]) == 0
    assert main(["show", str(out), "--input", str(SAMPLE.parent / "digit_3.png"), "--mode", "overlay",
                 "-o", str(png)]) == 0
    assert Image.open(png).format == "PNG"
    labels = tmp_path / "digits.txt"
    labels.write_text("".join(f"digit {k}\n" for k in range(10)))
    heat = tmp_path / "h.png"
    assert main(["explain", CNN, "--rules", "gradient", "--input", str(SAMPLE), "--heatmap", str(heat),
                 "--mode", "masked", "--sign", "positive", "--labels", str(labels)]) == 0
    assert Image.open(heat).size[1] > 2 * Image.open(heat).size[0]  # eight rows, one per batch item


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".bmp", "BMP"), (".gif", "GIF"), (".jpg", "JPEG"),
                                        (".tiff", "TIFF")])
def test_heatmap_formats(tmp_path, suffix, fmt):
    out = tmp_path / f"h{suffix}"
    assert main(["explain", CNN, "--rules", "lrp-epsilon", "--input", str(SAMPLE), "--heatmap",
                 str(out)]) == 0
    assert Image.open(out).format == fmt


def test_cli_show_1d_rows_with_their_signals(tmp_path):
    t = np.linspace(0, 6, 100)
    np.save(tmp_path / "rel.npy", np.stack([np.sin(t), np.cos(t)]))
    np.save(tmp_path / "x.npy", np.stack([t, -t]))
    assert main(["show", str(tmp_path / "rel.npy"), "--input", str(tmp_path / "x.npy"), "-o",
                 str(tmp_path / "p.png")]) == 0
    fig = viz.render_array(np.stack([np.sin(t), np.cos(t)]), signals=np.stack([t, -t]))
    lines = [ax.lines[0].get_ydata() for ax in fig.axes if ax.lines and len(ax.lines[0].get_ydata()) == 100]
    np.testing.assert_allclose(lines, [t, -t])


def test_cli_show_tokens(tmp_path, capsys):
    rel, ids = tmp_path / "rel.npy", tmp_path / "ids.npy"
    vocab, page = tmp_path / "vocab.txt", tmp_path / "t.html"
    np.save(rel, np.array([[1.0, -1.0, 0.5]]))
    np.save(ids, np.array([[2, 0, 1]]))
    vocab.write_text("a\nb\nc\n")
    assert main(["show", str(rel), "--tokens", str(ids), "--vocab", str(vocab), "-o", str(page)]) == 0
    assert page.read_text().count("<span") == 3
    assert main(["show", str(rel), "--token-list", "x,y,z"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "x y z"  # captured output is no terminal


@pytest.mark.parametrize("argv,message", [
    (lambda w: ["show", str(w / "five.npy"), "-o", str(w / "o.png")], "plot it yourself"),
    (lambda w: ["show", str(w / "rel.npy"), "--input", str(w / "rows.npy"), "-o", str(w / "o.png")],
     "has 2 rows, the attribution 1"),
    (lambda w: ["explain", CNN, "--rules", "lrp-epsilon", "--input", str(SAMPLE), "--heatmap",
                str(w / "h.png"),
                "--labels", str(w / "bad.txt")], "bad.txt:2: expected 'index,name'"),
    (lambda w: ["explain", CNN, "--rules", "lrp-epsilon", "--input", str(SAMPLE), "--heatmap",
                str(w / "h.png"),
                "--show", "saliency"], "--show saliency needs a rule file whose quantity is importance"),
    (lambda w: ["show", str(w / "rel.npy"), "--mode", "overlay", "-o", str(w / "o.png")],
     "draws on the input"),
    (lambda w: ["show", str(w / "rel.npy"), "--clip", "0", "-o", str(w / "o.png")], "clip percentile"),
    (lambda w: ["show", str(w / "rel.npy"), "--input", str(w / "small.npy"), "--mode", "overlay", "-o",
                str(w / "o.png")], "the input is 2x2 pixels but the map 4x4"),
    (lambda w: ["compare", CNN, "--rules", "lrp-epsilon,no-such-rules", "--input", str(SAMPLE), "-o",
                str(w / "g.png")], "no-such-rules"),
    (lambda w: ["compare", CNN, "--rules", "lrp-epsilon", "--input", str(SAMPLE), "-o", str(w / "g.html")],
     "extension '.html'"),
    (lambda w: ["explain", CNN, "--rules", "lrp-epsilon", "--input", str(SAMPLE), "--heatmap",
                str(w / "t.html")], "an .html page shows token-id inputs"),
])
def test_bad_inputs_exit_2(tmp_path, capsys, argv, message):
    np.save(tmp_path / "five.npy", np.zeros((1, 1, 2, 2, 2)))
    np.save(tmp_path / "rel.npy", np.ones((1, 4, 4)))
    np.save(tmp_path / "rows.npy", np.ones((2, 4, 4)))
    np.save(tmp_path / "small.npy", np.ones((1, 3, 2, 2)))
    (tmp_path / "bad.txt").write_text("0,zero\none\n")
    assert main(argv(tmp_path)) == 2
    assert message in capsys.readouterr().err


def test_unknown_mode_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["show", "r.npy", "--mode", "sparkle"])
    assert exc.value.code == 2 and "invalid choice: 'sparkle'" in capsys.readouterr().err


# ---- the real photo ------------------------------------------------------------------------------

def kitten():
    photo = Image.open(SHARED / "kitten_224.png").convert("RGB").resize((224, 224))
    rgb = np.asarray(photo, dtype=np.float32)
    bgr = rgb[:, :, ::-1] - np.array([104, 117, 123], dtype=np.float32)
    return rgb / 255, np.ascontiguousarray(bgr.transpose(2, 0, 1)[None])


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/models/ is not beside this checkout")
@pytest.mark.parametrize("rules", ["lrp-epsilon", "lrp-composite"])
def test_squeezenet_relevance_lies_on_the_kitten(rules):
    """The kitten photo has a light background: the clipped map's strongest pixels lie on the (darker)
    cat at least 1.5 times as often as pixels drawn at random do (measured: 1.6 for lrp-epsilon, 2.2
    for lrp-composite)."""
    rgb, x = kitten()
    result = Explainer(str(SHARED / "squeezenet1.1_fp32.onnx"), rules).explain(x)
    v, _ = viz.normalize(viz.reduce_channels(result.map[0]), sign="absolute")
    on_cat = rgb.mean(axis=-1) < 0.85
    strongest = v >= 0.5
    assert strongest.sum() > 100 and (strongest & on_cat).sum() / strongest.sum() > 1.5 * on_cat.mean()
    lo, hi = rgb.min(axis=(0, 1)), rgb.max(axis=(0, 1))
    np.testing.assert_allclose(viz.display_image(x[0], bgr=True), (rgb - lo) / (hi - lo), atol=1e-6)


def test_import_rulegraph_does_not_load_matplotlib():
    import subprocess
    import sys

    code = "import sys, rulegraph, rulegraph.viz, rulegraph.cli; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_explain_token_relevance_as_an_html_page(tmp_path):
    """A token model (tests/test_transformer.py): one span per token, the vocabulary's text, the
    relevance ``result.attribution['ids']`` in each span's title, its colour the numpy replica's."""
    import onnx
    from test_transformer import IDS, MASK, token_model

    model, vocab, page = tmp_path / "tokens.onnx", tmp_path / "vocab.txt", tmp_path / "t.html"
    onnx.save(token_model(), str(model))
    np.savez(tmp_path / "x.npz", ids=IDS, mask=MASK)
    words = [f"w{k}" for k in range(11)]
    vocab.write_text("\n".join(words) + "\n")
    assert main(["explain", str(model), "--rules", "lrp-transformer", "--input", str(tmp_path / "x.npz"),
                 "--heatmap", str(page), "--vocab", str(vocab)]) == 0
    text = page.read_text()
    result = Explainer(str(model), "lrp-transformer").explain({"ids": IDS, "mask": MASK})
    spans = re.findall(r'rgb\((\d+), (\d+), (\d+)\)" title="([^"]*)">([^<]*)</span>', text)
    assert [s[4] for s in spans] == [words[i] for i in IDS.reshape(-1)]
    for row in range(len(IDS)):
        v, _ = viz.normalize(result.attribution["ids"][row])
        got = spans[row * IDS.shape[1]:(row + 1) * IDS.shape[1]]
        assert [tuple(int(c) for c in s[:3]) for s in got] == \
            [tuple(int(round(c * 255)) for c in rgb) for rgb in viz.colours(v)]
        np.testing.assert_allclose([float(s[3]) for s in got], result.attribution["ids"][row], rtol=1e-3)
