"""A model's image preprocessing, described once: ``Preprocess`` (a frozen dataclass), named presets,
a preset file next to the model (``model.preprocess.json``), and the steps applied to an image.

The steps, in order (what torchvision's ``Resize(S)``, ``CenterCrop``, ``ToTensor``, ``Normalize``
do, and Caffe's BGR 0..255 minus the channel means):

1. ``resize``: an int S scales the shorter side to S (the longer to ``int(S · long / short)``), a pair
   (H, W) resizes to H×W; Pillow's bilinear filter (antialiased when shrinking) on the 8-bit image;
2. ``crop`` (H, W): the centre box, top ``round((h - H) / 2)``, left ``round((w - W) / 2)``;
   with neither resize nor crop the image is resized to the model's fixed H×W;
3. values: pixel / 255 (16-bit / 65535) · ``scale``, so ``scale=255`` keeps 0..255;
4. ``order`` "BGR" reverses the channels (RGB -> BGR);
5. ``(x - mean) / std`` per channel, in the model's channel order and the scaled range;
6. ``layout`` "NCHW" gives [1, C, H, W], "NHWC" [1, H, W, C].

``labels`` names a class-names file (relative paths resolve against the preset file's folder).
``.npy``/``.npz`` inputs are taken as already preprocessed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RulegraphError, RulegraphWarning, did_you_mean
from .images import HIGH_DEPTH_MODES, high_depth, open_image

#: the key of the compiled explainer's ``metadata_props`` entry holding the description as JSON
METADATA_KEY = "rulegraph.preprocess"
ORDERS, LAYOUTS = ("RGB", "BGR"), ("NCHW", "NHWC")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input (the module docstring gives the steps)."""

    resize: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    order: str = "RGB"
    layout: str = "NCHW"
    labels: str | None = None

    def __post_init__(self):
        problems = _problems(self)
        if problems:
            raise RulegraphError("preprocessing: " + "; ".join(problems))

    def replace(self, **changes) -> Preprocess:
        """A copy with ``changes`` (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        """The JSON form: lists for tuples, every field present."""
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def describe(self) -> str:
        """One line for people: ``resize 256, crop 224x224, RGB, [0, 1], mean (...), std (...), NCHW``."""
        parts = []
        if self.resize is not None:
            parts.append(f"resize {_size(self.resize)}")
        if self.crop is not None:
            parts.append(f"crop {_size(self.crop)}")
        parts += [self.order, f"[0, {self.scale:g}]"]
        if self.mean is not None:
            parts.append(f"mean ({', '.join(f'{m:g}' for m in self.mean)})")
        if self.std is not None:
            parts.append(f"std ({', '.join(f'{s:g}' for s in self.std)})")
        parts.append(self.layout)
        if self.labels:
            parts.append(f"labels {self.labels}")
        return ", ".join(parts)


def _size(value) -> str:
    return str(value) if isinstance(value, int) else f"{value[0]}x{value[1]}"


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _pair(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(_positive_int(v) for v in value)


def _numbers(value) -> bool:
    return isinstance(value, tuple) and len(value) > 0 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


#: field -> (valid?, what is expected): every problem of a description is reported at once
CHECKS = {
    "resize": (lambda v: v is None or _positive_int(v) or _pair(v),
               "a positive int (the shorter side) or a pair [H, W] of positive ints"),
    "crop": (lambda v: v is None or _pair(v), "a pair [H, W] of positive ints"),
    "scale": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and v > 0, "a positive number (255 for 0..255)"),
    "mean": (lambda v: v is None or _numbers(v), "a list of finite numbers, one per channel"),
    "std": (lambda v: v is None or (_numbers(v) and all(s != 0 for s in v)),
            "a list of non-zero finite numbers, one per channel"),
    "order": (lambda v: v in ORDERS, f"one of {', '.join(ORDERS)}"),
    "layout": (lambda v: v in LAYOUTS, f"one of {', '.join(LAYOUTS)}"),
    "labels": (lambda v: v is None or isinstance(v, str), "a file path"),
}


def _problems(spec: Preprocess) -> list[str]:
    return [f"{name} is {getattr(spec, name)!r}; expected {expected}"
            for name, (valid, expected) in CHECKS.items() if not valid(getattr(spec, name))]


#: named presets (``--preprocess NAME``)
PRESETS = {
    "imagenet": Preprocess(resize=256, crop=(224, 224), mean=(0.485, 0.456, 0.406),
                           std=(0.229, 0.224, 0.225)),
    "imagenet-caffe": Preprocess(resize=256, crop=(224, 224), scale=255.0, order="BGR",
                                 mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0)),
}


def _tuples(data: dict) -> dict:
    """JSON lists as tuples; a single number for ``crop`` means a square, for mean/std every channel."""
    out = dict(data)
    for key in ("resize", "crop", "mean", "std"):
        value = out.get(key)
        if isinstance(value, list):
            out[key] = tuple(value)
        elif key == "crop" and _positive_int(value):
            out[key] = (value, value)
        elif key in ("mean", "std") and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = (value,)
    return out


def from_dict(data, where: str, base_dir: Path | None = None) -> Preprocess:
    """A description from its JSON form; ``"preset": NAME`` starts from a named preset."""
    if not isinstance(data, dict):
        raise RulegraphError(f"{where}: expected a JSON object such as {{\"preset\": \"imagenet\"}}, "
                             f"found {type(data).__name__}")
    data = dict(data)
    base = preset(data.pop("preset"), where) if "preset" in data else Preprocess()
    fields = {f.name for f in dataclasses.fields(Preprocess)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise RulegraphError(f"{where}: unknown key(s) {unknown}{did_you_mean(unknown[0], fields)}; "
                             f"the keys are preset, {', '.join(sorted(fields))}")
    data = _tuples(data)
    if base_dir is not None and isinstance(data.get("labels"), str):
        data["labels"] = str(base_dir / data["labels"])
    try:
        return dataclasses.replace(base, **data)
    except RulegraphError as exc:
        raise RulegraphError(f"{where}: {exc}") from None


def preset(name: str, where: str = "--preprocess") -> Preprocess:
    """A named preset, or an error listing them."""
    if name not in PRESETS:
        raise RulegraphError(f"{where}: unknown preprocessing preset '{name}'"
                             f"{did_you_mean(str(name), PRESETS)}; the presets are "
                             f"{', '.join(sorted(PRESETS))} (or give a .json file)")
    return PRESETS[name]


def read_file(path: str | Path) -> Preprocess:
    """A preset file (JSON); malformed JSON is reported as ``file:line:col``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulegraphError(f"{path}: cannot read the preprocessing file ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RulegraphError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    return from_dict(data, str(path), path.parent)


def resolve(value: str | Path | Preprocess | dict | None) -> Preprocess | None:
    """A description from a preset name, a .json path, a dict or a Preprocess (None stays None)."""
    if value is None or isinstance(value, Preprocess):
        return value
    if isinstance(value, dict):
        return from_dict(value, "preprocess")
    text = str(value)
    if text in PRESETS:
        return PRESETS[text]
    if Path(text).is_file():
        return read_file(text)
    if text.endswith(".json"):
        raise RulegraphError(f"--preprocess {text}: no such file")
    return preset(text)


def beside(model) -> Path | None:
    """The preset file next to a model file (``model.onnx`` -> ``model.preprocess.json``), if present."""
    if not isinstance(model, (str, Path)):
        return None
    path = Path(model).with_suffix(".preprocess.json")
    return path if path.is_file() else None


def layout_shape(spec: Preprocess, shape) -> tuple:
    """(channels, height, width) of a model input ``shape`` [N, C, H, W] or [N, H, W, C]."""
    if spec.layout == "NHWC":
        return shape[3], shape[1], shape[2]
    return shape[1], shape[2], shape[3]


def check_against(spec: Preprocess, shape, where: str) -> None:
    """Refuse a description that cannot give the model input ``shape`` (channels, mean/std length,
    the final H×W), naming the input and the fix."""
    if shape is None or len(shape) != 4:
        raise RulegraphError(f"{where}: an image needs a model input of rank 4 ({spec.layout}); it has "
                             f"shape {shape}")
    channels, height, width = layout_shape(spec, shape)
    if isinstance(channels, int) and channels not in (1, 3):
        other = "NHWC" if spec.layout == "NCHW" else "NCHW"
        raise RulegraphError(f"{where}: shape {list(shape)} read as {spec.layout} has {channels} channels; "
                             f"images give 1 (grey) or 3: is the layout {other} (--nhwc)? Else pass a .npy")
    for name in ("mean", "std"):
        values = getattr(spec, name)
        if values is not None and isinstance(channels, int) and len(values) not in (1, channels):
            raise RulegraphError(f"{where}: {name} has {len(values)} values but the model takes {channels} "
                                 f"channel(s) (shape {list(shape)}, {spec.layout}); give {channels} values "
                                 f"or one")
    final = spec.crop if spec.crop is not None else (
        spec.resize if isinstance(spec.resize, tuple) else None)
    fixed = isinstance(height, int) and isinstance(width, int)
    if final is not None and fixed and tuple(final) != (height, width):
        raise RulegraphError(f"{where}: the preprocessing gives {final[0]}x{final[1]} images but the model "
                             f"takes {height}x{width} (shape {list(shape)}); set --crop {height},{width}")


def _open(source):
    """A Pillow image from a path or an image (refusing unreadable files by name)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source, "the image"
    return open_image(Path(source)), str(source)


def resized_size(spec: Preprocess, size: tuple[int, int], model_hw) -> tuple[int, int] | None:
    """The (W, H) Pillow resizes to, or None to keep the image's size."""
    width, height = size
    if isinstance(spec.resize, int):
        short, long = min(width, height), max(width, height)
        other = int(spec.resize * long / short)
        return (spec.resize, other) if width <= height else (other, spec.resize)
    if isinstance(spec.resize, tuple):
        return spec.resize[1], spec.resize[0]
    if spec.crop is None and model_hw is not None:
        return model_hw[1], model_hw[0]
    return None


def crop_box(spec: Preprocess, height: int, width: int, where: str) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the centre crop of an image of ``height`` × ``width``."""
    if spec.crop is None:
        return 0, 0, height, width
    ch, cw = spec.crop
    if ch > height or cw > width:
        raise RulegraphError(f"{where}: the crop {ch}x{cw} is larger than the resized image "
                             f"{height}x{width}; crop at most {height}x{width}, or resize to at least "
                             f"{ch}x{cw}")
    top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
    return top, left, top + ch, left + cw


def preprocess(source, spec: Preprocess | str | Path | dict, channels: int = 3,
               model_hw: tuple[int, int] | None = None) -> np.ndarray:
    """An image (a path or a Pillow image) as the model's float32 input [1, C, H, W] (or NHWC),
    through ``spec``'s steps; ``channels`` 1 reads it grey; ``model_hw`` is the size to resize to
    when ``spec`` has neither resize nor crop."""
    from PIL import Image

    spec = resolve(spec) or Preprocess()
    image, where = _open(source)
    if channels not in (1, 3):
        raise RulegraphError(f"{where}: the model takes {channels} channels; images give 1 (grey) or 3")
    for name in ("mean", "std"):
        values = getattr(spec, name)
        if values is not None and len(values) not in (1, channels):
            raise RulegraphError(f"{where}: {name} has {len(values)} values for {channels} channel(s); give "
                                 f"{channels} values or one")
    size = resized_size(spec, image.size, model_hw)
    if image.mode in HIGH_DEPTH_MODES:  # 16-bit / float single channel: [0, 1] (F as stored), float resize
        array = high_depth(Path(where), image, size)[..., None]
        if channels == 3:
            array = np.repeat(array, 3, axis=2)
    else:
        image = image.convert("L" if channels == 1 else "RGB")
        if size is not None and size != image.size:
            image = image.resize(size, Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32).reshape(image.size[1], image.size[0], channels) / 255.0
    top, left, bottom, right = crop_box(spec, array.shape[0], array.shape[1], where)
    array = array[top:bottom, left:right].astype(np.float64) * spec.scale
    if spec.order == "BGR" and channels == 3:
        array = array[..., ::-1]
    if spec.mean is not None:
        array = array - np.asarray(spec.mean, dtype=np.float64)
    if spec.std is not None:
        array = array / np.asarray(spec.std, dtype=np.float64)
    if spec.layout == "NCHW":
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array, dtype=np.float32)[None]


def already_preprocessed(path, spec: Preprocess) -> None:
    """Say that an array file is fed as it is, not through ``spec``."""
    warnings.warn(f"{path}: an array file is taken as already preprocessed; the preprocessing "
                  f"({spec.describe()}) applies to images only", RulegraphWarning, stacklevel=3)


def to_metadata(model, spec: Preprocess):
    """A copy of the ONNX ``model`` whose ``metadata_props`` hold ``spec`` under ``METADATA_KEY``."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [(p.key, p.value) for p in copy.metadata_props if p.key != METADATA_KEY]
    del copy.metadata_props[:]
    for key, value in [*kept, (METADATA_KEY, spec.to_json())]:
        entry = copy.metadata_props.add()
        entry.key, entry.value = key, value
    return copy


def from_metadata(model) -> Preprocess | None:
    """The description saved in a compiled explainer (a ModelProto or a path), or None."""
    import onnx

    where = "the model"
    if not isinstance(model, onnx.ModelProto):
        where = str(model)
        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError, OSError, ... for a file that is not a model
            raise RulegraphError(f"{where} is not a readable ONNX model ({exc})") from None
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                data = json.loads(prop.value)
            except json.JSONDecodeError as exc:
                raise RulegraphError(f"{where}: metadata '{METADATA_KEY}' is not valid JSON ({exc.msg})") \
                    from None
            return from_dict(data, f"{where}: metadata '{METADATA_KEY}'")
    return None
