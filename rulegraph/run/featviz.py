"""Feature visualization by optimization: an input, grown from noise, that maximizes a unit.

The objective of row i is ``Σ seed_i · T(x_i)`` for a tensor T: a channel's mean (seed 1/(h·w) on the
channel), a neuron (seed 1 at one position) or a direction (a vector over channels, its mean over
positions). Each Adam step takes the objective and dObjective/dx of all rows from ONE run of the compiled
gradient explainer started at T (``Explainer(model, "gradient", start=T)``, the seed array as target);
the rest lives in numpy on the host and is differentiated by hand, exactly:

1. parameters: a spectrum (real, imaginary) per channel; ``irfft2(spectrum / max(f, 1/max(H, W)))``
   (a 1/f amplitude scaling, so every frequency band learns at the same rate), orthonormal FFT;
2. colour decorrelation: each pixel's 3 values times a fixed 3×3 matrix, the square root of the
   ImageNet colour correlation as published by Lucid (``COLOUR_SQRT`` below, rescaled so its largest
   column norm is 1); then a sigmoid gives RGB in [0, 1];
3. transformations, sampled per step: constant padding (value 0.5), integer jitter (``np.roll``), then
   one bilinear resampling for scale and rotation about the centre back to H×W (its adjoint scatters
   the gradient back with the same weights);
4. the model's preprocessing (``preprocess.py``: scale, BGR, mean/std, layout), a per-channel affine map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import RulegraphError

#: square root (from its SVD) of the colour correlation of ImageNet pixels, rows R, G, B: the numbers
#: published in Lucid (tensorflow/lucid, ``optvis/param/color.py``, ``color_correlation_svd_sqrt``)
COLOUR_SQRT = np.array([[0.26, 0.09, 0.02],
                        [0.27, 0.00, -0.05],
                        [0.27, -0.09, 0.03]])
COLOUR = COLOUR_SQRT / np.max(np.linalg.norm(COLOUR_SQRT, axis=0))


class FeatvizError(RulegraphError):
    """A bad layer, channel, neuron or direction for ``visualize``."""


# ---- the parameterization: spectrum -> decorrelated colours -> sigmoid -------------------------------

def spectrum_scale(h: int, w: int) -> np.ndarray:
    """1 / max(|f|, 1/max(h, w)) on the rfft2 grid [h, w//2 + 1]."""
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    return 1.0 / np.maximum(f, 1.0 / max(h, w))


def _hermitian_weights(w: int) -> np.ndarray:
    """How often each rfft column appears in the full spectrum (1 for 0 and w/2, else 2)."""
    k = np.full(w // 2 + 1, 2.0)
    k[0] = 1.0
    if w % 2 == 0:
        k[-1] = 1.0
    return k


@dataclass
class Parameterization:
    """Spectrum parameters [N, C, H, W//2+1, 2] -> images [N, C, H, W] in [0, 1] (C 1 or 3)."""

    channels: int
    height: int
    width: int
    colour: np.ndarray = field(init=False)

    def __post_init__(self):
        self.scale = spectrum_scale(self.height, self.width)
        self.colour = COLOUR if self.channels == 3 else np.eye(self.channels)

    def init(self, n: int, rng: np.random.Generator, std: float = 0.01) -> np.ndarray:
        return rng.normal(0.0, std, (n, self.channels, self.height, self.width // 2 + 1, 2))

    def forward(self, p: np.ndarray):
        """(image, cache for ``backward``)."""
        z = (p[..., 0] + 1j * p[..., 1]) * self.scale
        spatial = np.fft.irfft2(z, s=(self.height, self.width), norm="ortho")
        mixed = np.einsum("ij,njhw->nihw", self.colour, spatial)
        image = 1.0 / (1.0 + np.exp(-mixed))
        return image, image

    def backward(self, image: np.ndarray, g: np.ndarray) -> np.ndarray:
        """dL/dp from dL/dimage (the adjoint of each step above, in reverse)."""
        g = g * image * (1.0 - image)
        g = np.einsum("ij,nihw->njhw", self.colour, g)
        gz = np.fft.rfft2(g, norm="ortho") * _hermitian_weights(self.width) * self.scale
        return np.stack([gz.real, gz.imag], axis=-1)


# ---- transformations with their adjoints ---------------------------------------------------------

@dataclass(frozen=True)
class Transform:
    """Pad by ``pad`` (value 0.5), roll by (dy, dx), resample scaled by ``zoom`` and rotated by
    ``angle`` degrees about the centre, back to the original H×W (bilinear; outside: 0.5)."""

    pad: int = 0
    dy: int = 0
    dx: int = 0
    zoom: float = 1.0
    angle: float = 0.0

    def _taps(self, h: int, w: int):
        """For every output pixel, the 4 source indices into the padded image and their weights."""
        hp, wp = h + 2 * self.pad, w + 2 * self.pad
        yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
        t = np.deg2rad(self.angle)
        c, s = np.cos(t) / self.zoom, np.sin(t) / self.zoom
        sy = c * yy - s * xx + (hp - 1) / 2
        sx = s * yy + c * xx + (wp - 1) / 2
        y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
        fy, fx = sy - y0, sx - x0
        taps = []
        for oy, ox, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)),
                           (1, 1, fy * fx)):
            yi, xi = y0 + oy, x0 + ox
            inside = (yi >= 0) & (yi < hp) & (xi >= 0) & (xi < wp)
            taps.append((np.where(inside, yi * wp + xi, 0), np.where(inside, wt, 0.0)))
        return taps, hp, wp

    def apply(self, x: np.ndarray) -> np.ndarray:
        n, ch, h, w = x.shape
        padded = np.pad(x, ((0, 0), (0, 0), (self.pad,) * 2, (self.pad,) * 2), constant_values=0.5)
        padded = np.roll(padded, (self.dy, self.dx), axis=(2, 3))
        taps, hp, wp = self._taps(h, w)
        flat = padded.reshape(n, ch, hp * wp)
        out = sum(flat[..., idx] * wt for idx, wt in taps)
        outside = 1.0 - sum(wt for _, wt in taps)  # weight of the constant 0.5 beyond the padded image
        return out + 0.5 * outside

    def adjoint(self, g: np.ndarray) -> np.ndarray:
        """The gradient wrt the input of ``apply`` from the gradient wrt its output."""
        n, ch, h, w = g.shape
        taps, hp, wp = self._taps(h, w)
        flat = np.zeros((n * ch, hp * wp))
        g2 = g.reshape(n * ch, h * w)
        rows = np.arange(n * ch)[:, None]
        for idx, wt in taps:
            np.add.at(flat, (rows, idx.reshape(1, -1)), g2 * wt.reshape(1, -1))
        padded = np.roll(flat.reshape(n, ch, hp, wp), (-self.dy, -self.dx), axis=(2, 3))
        return padded[:, :, self.pad:self.pad + h, self.pad:self.pad + w]


def sample_transform(rng: np.random.Generator, pad: int, jitter: int, scales, angles) -> Transform:
    """One step's transformation: jitter uniform in [-jitter, jitter], scale and angle from the lists."""
    dy, dx = (int(v) for v in rng.integers(-jitter, jitter + 1, 2)) if jitter else (0, 0)
    return Transform(pad, dy, dx, float(rng.choice(scales)), float(rng.choice(angles)))


# ---- the model's preprocessing as an affine map per channel ----------------------------------------

def preprocess_affine(spec, channels: int):
    """(a, b, reverse): model input channel k = a[k] · image channel (reversed when BGR) + b[k]."""
    if spec is None:
        return np.ones(channels), np.zeros(channels), False
    mean = np.broadcast_to(np.asarray(spec.mean if spec.mean is not None else (0.0,), float), (channels,))
    std = np.broadcast_to(np.asarray(spec.std if spec.std is not None else (1.0,), float), (channels,))
    return spec.scale / std, -mean / std, spec.order == "BGR" and channels == 3


def to_model(x: np.ndarray, affine, layout: str) -> np.ndarray:
    a, b, reverse = affine
    y = (x[:, ::-1] if reverse else x) * a[:, None, None] + b[:, None, None]
    return y.transpose(0, 2, 3, 1) if layout == "NHWC" else y


def from_model_gradient(g: np.ndarray, affine, layout: str) -> np.ndarray:
    a, _, reverse = affine
    g = g.transpose(0, 3, 1, 2) if layout == "NHWC" else g
    g = g * a[:, None, None]
    return g[:, ::-1] if reverse else g


# ---- objectives and the optimization -----------------------------------------------------------------

def seeds(shape, channels, kind: str = "channel", direction=None, layer: str = "") -> np.ndarray:
    """One seed per row for a start tensor of one row's ``shape`` [C, ...]: ``channel`` (mean over the
    positions), ``neuron`` (the centre position), ``direction`` (a vector over channels, position mean)."""
    shape = tuple(shape)
    if len(shape) < 1:
        raise FeatvizError(f"tensor '{layer}' is a scalar per row; give a tensor with channels")
    positions = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if kind == "direction":
        d = np.asarray(direction, dtype=np.float64)
        d = d[None] if d.ndim == 1 else d
        if d.ndim != 2 or d.shape[1] != shape[0]:
            raise FeatvizError(f"a direction for tensor '{layer}' is a vector of its {shape[0]} channels "
                               f"(or one per row); got shape {list(np.shape(direction))}")
        return np.broadcast_to(d.reshape(len(d), shape[0], *([1] * (len(shape) - 1))),
                               (len(d), *shape)) / positions
    table = {"channel": lambda s, c: s.__setitem__(c, 1.0 / positions),
             "neuron": lambda s, c: s.__setitem__((c, *(n // 2 for n in shape[1:])), 1.0)}
    if kind not in table:
        raise FeatvizError(f"unknown objective '{kind}'; use one of channel, neuron, direction")
    out = np.zeros((len(channels), *shape))
    for row, c in enumerate(channels):
        if not 0 <= c < shape[0]:
            raise FeatvizError(f"channel {c} is out of range for tensor '{layer}' with {shape[0]} channels "
                               f"(shape {list(shape)}); give channels 0..{shape[0] - 1}")
        table[kind](out[row], c)
    return out


def parse_channels(text: str) -> list[int]:
    """``0-15``, ``3,5,9`` or ``0-3,8`` -> a list of channel indices."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        except ValueError:
            raise FeatvizError(f"--channels: '{part}' is not a channel or a range like 0-15") from None
    if not out:
        raise FeatvizError("--channels names no channel")
    return out


@dataclass
class Visualization:
    """The images [N, C, H, W] in [0, 1] (RGB), the objective per step [steps, N], the channels."""

    images: np.ndarray
    history: np.ndarray
    channels: list[int]
    layer: str


class Visualizer:
    """The compiled gradient explainer at ``layer`` and the host pipeline around it."""

    def __init__(self, model, layer: str, preprocess=None, providers=None):
        from ..compile.layers import resolve_tensor
        from .explainer import Explainer

        self.explainer = Explainer(model, "gradient", start=layer, preprocess=preprocess, providers=providers)
        graph = self.explainer.graph
        self.layer = resolve_tensor(graph, layer)
        self.input = graph.inputs[0]
        #: the input's element type: float32, or float64 for a float64 model (exact gradient checks)
        self.dtype = np.float64 if graph.dtypes.get(self.input) == onnx.TensorProto.DOUBLE else np.float32
        self.spec = self.explainer.preprocess
        self.layout = self.spec.layout if self.spec is not None else "NCHW"
        shape = graph.shapes.get(self.input) or []
        dims = list(shape[1:])
        if self.layout == "NHWC":
            dims = [dims[2], dims[0], dims[1]] if len(dims) == 3 else dims
        if len(dims) != 3 or not all(isinstance(d, int) for d in dims) or dims[0] not in (1, 3):
            raise FeatvizError(f"input '{self.input}' has shape {shape}; visualize needs a fixed image "
                               f"input [N, 1 or 3, H, W] ({self.layout})")
        self.channels_in, self.height, self.width = dims
        self.param = Parameterization(self.channels_in, self.height, self.width)
        self.affine = preprocess_affine(self.spec, self.channels_in)

    def objective_and_gradient(self, p: np.ndarray, seed: np.ndarray, transform: Transform):
        """(objective per row, dObjective/dp) through parameterization, transform, preprocessing and
        ONE run of the explainer."""
        image, cache = self.param.forward(p)
        x = to_model(transform.apply(image), self.affine, self.layout)
        result = self.explainer.explain(x.astype(self.dtype), target=seed.astype(self.dtype),
                                        max_amplification=None)
        objective = (seed * result.start.astype(np.float64)).reshape(len(seed), -1).sum(axis=1)
        g = from_model_gradient(result.saliency[self.input].astype(np.float64), self.affine, self.layout)
        return objective, self.param.backward(cache, transform.adjoint(g))

    def start_shape(self) -> tuple:
        x = to_model(np.full((1, self.channels_in, self.height, self.width), 0.5), self.affine, self.layout)
        return self.explainer.forward(x.astype(self.dtype))[self.layer].shape[1:]

    def run(self, channels, kind: str = "channel", direction=None, steps: int = 256, lr: float = 0.05,
            seed: int = 0, pad: int = 12, jitter: int = 8, scales=(1.0, 0.975, 1.025, 0.95, 1.05),
            angles=tuple(range(-5, 6)), progress=None) -> Visualization:
        """Adam on the spectra of all rows at once (one row per channel, or per direction)."""
        target = seeds(self.start_shape(), channels, kind, direction, self.layer)
        rng = np.random.default_rng(seed)
        p = self.param.init(len(target), rng)
        m, v = np.zeros_like(p), np.zeros_like(p)
        history = []
        for t in range(1, steps + 1):
            transform = sample_transform(rng, pad, jitter, scales, angles)
            objective, g = self.objective_and_gradient(p, target, transform)
            history.append(objective)
            g = -g  # ascent
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            p = p - lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
            if progress is not None:
                progress(t, objective)
        images = self.param.forward(p)[0]
        labels = list(channels) if kind != "direction" else list(range(len(target)))
        return Visualization(images, np.array(history), labels, self.layer)


def visualize(model, layer: str, channels=(0,), kind: str = "channel", direction=None, preprocess=None,
              **options) -> Visualization:
    """Feature visualizations of ``channels`` (or a ``direction``) of tensor ``layer``; ``options`` as
    for ``Visualizer.run`` (steps, lr, seed, pad, jitter, scales, angles)."""
    return Visualizer(model, layer, preprocess).run(list(channels), kind, direction, **options)

