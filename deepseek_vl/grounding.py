"""Parse and draw DeepSeek-VL2 visual-grounding answers.

The model marks grounded phrases as ``<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>``
with integer coordinates in 0..999 relative to the image: pixel x = x / 999 * width,
pixel y = y / 999 * height (the ``/ 999`` of the official web demo).

Model output may be truncated or malformed, so ``parse_grounding`` never raises on it
(and never ``eval``s it): it keeps what it can and reports each repair or skip in
``GroundingResult.problems``:

* a box is one innermost ``[...]`` of exactly 4 numbers (commas and/or spaces); anything
  else (points, 5 numbers, ``[]``, non-numbers, numbers outside brackets, a group cut off
  by truncation) is skipped; redundant nesting like ``[[[...]]]`` is accepted silently;
* values outside 0..999 are clamped, non-integers rounded, swapped corners (x1 > x2 or
  y1 > y2) put back in order; a box lying entirely outside 0..999 is dropped;
* a tag left open is closed at the next tag or at the end; a tag cut off at the very end
  (``<|/de``) is dropped; stray closing tags are ignored;
* each ``<|ref|>`` labels only the next ``<|det|>``; a ``<|det|>`` without one gets
  ``default_label`` (e.g. the ref of the prompt);
* the answer text never contains a tag, not even one that removing another tag would
  put back together (``<|de<|grounding|>t|>``).

Multi-image: one parse describes one image, ``image_index`` (default 0), and pixels use
``image_sizes[image_index]``; parse each image's answer with its own index.
"""

from __future__ import annotations

import colorsys
import functools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from deepseek_vl.utils.io import load_image

__all__ = [
    "GroundingBox",
    "GroundingResult",
    "annotate",
    "draw_grounding",
    "label_colors",
    "parse_grounding",
    "strip_grounding_markup",
]

MAX_COORD = 999
MAX_DRAWN_LABEL = 200  # characters of a label drawn on an image; longer ones end with an ellipsis
# Label fonts, broadest first: the model often answers in Chinese, and Pillow's own font has plain Latin letters only
# (a label like "café" or "长颈鹿" would be drawn as boxes). Found by name in the system's font folders
# (`apt-get install fonts-noto-cjk` for Chinese); Pillow's font is the last resort.
LABEL_FONTS = ("NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "wqy-microhei.ttc", "DejaVuSans.ttf")
Box = tuple[int, int, int, int]
RGB = tuple[int, int, int]

_TAG = re.compile(r"<\|(/?)(ref|det|grounding)\|>")
_TAG_AT_END = re.compile(r"<\|/?(?:ref|det|grounding)\|>\Z")
_CUT_TAG = re.compile(r"<\|/?[a-z]*\|?\Z")
_GROUP = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_SEPARATORS = re.compile(r"[\s,]+")
_BRACKETS_AND_SEPARATORS = re.compile(r"[\[\],\s]+")


@dataclass(frozen=True)
class GroundingBox:
    """One box: ``box`` in the model's 0..999 space, ``pixels`` when the image size is known."""

    label: str
    box: Box
    pixels: tuple[float, float, float, float] | None = None
    image_index: int = 0

    def to_dict(self) -> dict[str, Any]:
        pixels = None if self.pixels is None else list(self.pixels)
        return {"label": self.label, "box": list(self.box), "pixels": pixels, "image_index": self.image_index}


@dataclass
class GroundingResult:
    """Boxes found, the answer without markup (labels kept) and what had to be repaired."""

    boxes: list[GroundingBox] = field(default_factory=list)
    text: str = ""
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"boxes": [b.to_dict() for b in self.boxes], "text": self.text, "problems": list(self.problems)}


def parse_grounding(
    text: str,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    default_label: str = "",
    *,
    image_index: int = 0,
) -> GroundingResult:
    """Extract boxes from a model answer; malformed output is repaired or skipped, never raised.

    ``image_sizes`` is a list of (width, height); boxes refer to image ``image_index``.
    Raises TypeError/ValueError only for bad arguments from the caller.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if not isinstance(default_label, str):
        raise TypeError(f"default_label must be str, got {type(default_label).__name__}")
    if isinstance(image_index, bool) or not isinstance(image_index, int):
        raise TypeError(f"image_index must be int, got {type(image_index).__name__}")
    size = _selected_size(image_sizes, image_index)

    scanner = _Scanner(default_label)
    scanner.run(text)
    boxes = [
        GroundingBox(label, box, None if size is None else _scale(box, *size), image_index)
        for label, box in scanner.boxes
    ]
    return GroundingResult(boxes, _without_tags("".join(scanner.text_parts)).strip(), scanner.problems)


def strip_grounding_markup(text: str) -> str:
    """The answer as a reader should see it: tags and coordinates removed, labels kept."""
    return parse_grounding(text).text


def _without_tags(text: str) -> str:
    """Remove tags that form only once the tags between their pieces are gone, in one linear pass."""
    if not _TAG.search(text):
        return text
    out: list[str] = []
    for char in text:
        out.append(char)
        if char == ">" and (match := _TAG_AT_END.search("".join(out[-14:]))):
            del out[len(out) - len(match.group()) :]
    return "".join(out)


def _selected_size(image_sizes: Sequence[tuple[int, int]] | None, index: int) -> tuple[int, int] | None:
    """Validate ``image_sizes`` up front so a caller mistake fails loudly instead of silently."""
    if image_sizes is None:
        return None
    usage = "image_sizes must be a list of (width, height) pairs, e.g. [image.size]"
    if isinstance(image_sizes, (str, bytes)) or not isinstance(image_sizes, Sequence):
        raise TypeError(f"{usage}; got {type(image_sizes).__name__}")
    for size in image_sizes:
        if not isinstance(size, Sequence) or len(size) != 2 or not all(_is_number(v) for v in size):
            raise TypeError(f"{usage}; got element {size!r}")
        if not all(v > 0 for v in size):
            raise ValueError(f"image sizes must be positive, got {tuple(size)!r}")
    if not 0 <= index < len(image_sizes):
        raise ValueError(f"image_index {index} out of range for {len(image_sizes)} image size(s)")
    width, height = image_sizes[index]
    return width, height


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scale(box: Box, width: float, height: float) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (x1 / MAX_COORD * width, y1 / MAX_COORD * height, x2 / MAX_COORD * width, y2 / MAX_COORD * height)


class _Scanner:
    """Walks the tags; text between them goes to the answer, a label or a box list."""

    def __init__(self, default_label: str) -> None:
        self.default_label = default_label
        self.text_parts: list[str] = []
        self.boxes: list[tuple[str, Box]] = []
        self.problems: list[str] = []
        self.open: str | None = None  # "ref" or "det" while inside that tag
        self.inner: list[str] = []  # text inside the open tag
        self.label: str | None = None  # last ref, waiting for its det
        self.dets = 0

    def run(self, text: str) -> None:
        cut = _CUT_TAG.search(text)
        if cut:
            self.problems.append(f"text ends inside a tag {cut.group()!r}; dropped")
            text = text[: cut.start()]
        pos = 0
        for match in _TAG.finditer(text):
            self._segment(text[pos : match.start()])
            self._tag(match.group(2), closing=bool(match.group(1)))
            pos = match.end()
        self._segment(text[pos:])
        if self.open:
            self.problems.append(f"<|{self.open}|> not closed before the end of the text")
            self._close()

    def _segment(self, segment: str) -> None:
        if self.open:
            self.inner.append(segment)
        if self.open != "det":
            self.text_parts.append(segment)

    def _tag(self, name: str, closing: bool) -> None:
        if name == "grounding":  # a mode switch from the prompt, not part of the answer
            return
        if closing:
            if self.open == name:
                self._close()
            else:
                self.problems.append(f"stray <|/{name}|> ignored")
            return
        if self.open:
            self.problems.append(f"<|{self.open}|> not closed before <|{name}|>")
            self._close()
        self.open = name

    def _close(self) -> None:
        inner = "".join(self.inner)
        self.inner = []
        if self.open == "ref":
            self.label = inner.strip()
        else:
            self.dets += 1
            label = self.default_label if self.label is None else self.label
            self.label = None
            for box in _parse_det(inner, f"<|det|> #{self.dets}", self.problems):
                self.boxes.append((label, box))
        self.open = None


def _parse_det(content: str, where: str, problems: list[str]) -> list[Box]:
    """Each innermost ``[...]`` is one box; whatever else is in the tag is reported and ignored."""
    groups = _GROUP.findall(content)
    boxes = [box for group in groups if (box := _parse_box(group, f"{where} [{_short(group)}]", problems))]
    rest = _GROUP.sub("", content)
    if not _balanced(rest):
        problems.append(f"{where}: unbalanced brackets")
    if _BRACKETS_AND_SEPARATORS.sub("", rest):
        problems.append(f"{where}: ignored text outside complete boxes: {_short(rest.strip())!r}")
    elif not groups:
        problems.append(f"{where}: no boxes")
    return boxes


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def _parse_box(group: str, where: str, problems: list[str]) -> Box | None:
    tokens = [t for t in _SEPARATORS.split(group) if t]
    bad = [t for t in tokens if not _NUMBER.fullmatch(t)]
    if bad:
        problems.append(f"{where}: {_short(bad[0])!r} is not a number; box skipped")
        return None
    if len(tokens) != 4:
        problems.append(f"{where}: expected 4 numbers, got {len(tokens)}; box skipped")
        return None
    raw = [float(t) for t in tokens]
    if min(raw[0], raw[2]) > MAX_COORD or max(raw[0], raw[2]) < 0 or min(raw[1], raw[3]) > MAX_COORD or max(
        raw[1], raw[3]
    ) < 0:
        problems.append(f"{where}: box lies entirely outside 0..{MAX_COORD}; dropped")
        return None
    x1, y1, x2, y2 = (_coordinate(t, where, problems) for t in tokens)
    if x1 > x2 or y1 > y2:
        problems.append(f"{where}: corners in wrong order; swapped")
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _coordinate(token: str, where: str, problems: list[str]) -> int:
    value = float(token)  # may be inf for absurdly long digit strings; clamped below
    clamped = min(max(value, 0.0), float(MAX_COORD))
    if clamped != value:
        problems.append(f"{where}: {_short(token)} outside 0..{MAX_COORD}; clamped to {clamped:g}")
    elif not value.is_integer():
        problems.append(f"{where}: {token} is not an integer; rounded")
    return round(clamped)


def _short(text: str, limit: int = 40) -> str:
    """Keep problem messages readable when the model emits pages of garbage."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def label_colors(labels: Iterable[str]) -> dict[str, RGB]:
    """A distinct, deterministic colour per label, in order of first appearance (golden-ratio hues)."""
    colors: dict[str, RGB] = {}
    for label in labels:
        if label not in colors:
            hue = (len(colors) * 0.618033988749895) % 1.0
            r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
            colors[label] = (round(r * 255), round(g * 255), round(b * 255))
    return colors


def draw_grounding(
    image: Image.Image,
    result_or_boxes: GroundingResult | Iterable[GroundingBox],
    *,
    image_index: int = 0,
    width: int | None = None,
) -> Image.Image:
    """Return an RGB copy of ``image`` with the boxes of ``image_index`` drawn and labelled.

    Positions come from the 0..999 boxes and this image's size, so the drawing is
    right even if the boxes were parsed with another (or no) size.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise TypeError(f"width must be a positive int or None, got {width!r}")
    boxes = [b for b in _boxes_of(result_or_boxes) if b.image_index == image_index]

    out = load_image(image, max_pixels=None)  # a new RGB image, 16-bit scaled as the model saw it, not clipped
    w, h = out.size
    line = width if width is not None else max(1, round(max(w, h) / 250))
    font = label_font(max(10, round(max(w, h) / 40)))
    colors = label_colors(b.label for b in boxes)
    draw = ImageDraw.Draw(out)
    rects = [(_pixel_rect(b.box, w, h), b) for b in boxes]
    for rect, b in rects:
        draw.rectangle(rect, outline=colors[b.label], width=line)
    for rect, b in rects:  # labels last so no rectangle crosses a label
        if b.label:
            _draw_label(draw, font, b.label, rect, colors[b.label], (w, h))
    return out


@functools.cache
def label_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The first of `LABEL_FONTS` installed here, at `size` pixels."""
    for name in LABEL_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _boxes_of(result_or_boxes: GroundingResult | Iterable[GroundingBox]) -> list[GroundingBox]:
    if isinstance(result_or_boxes, GroundingResult):
        return result_or_boxes.boxes
    if isinstance(result_or_boxes, (str, bytes)) or not isinstance(result_or_boxes, Iterable):
        raise TypeError(f"expected a GroundingResult or GroundingBox items, got {type(result_or_boxes).__name__}")
    boxes = list(result_or_boxes)
    for b in boxes:
        if not isinstance(b, GroundingBox):
            raise TypeError(f"expected GroundingBox items, got {type(b).__name__}")
    return boxes


def _pixel_rect(box: Box, w: int, h: int) -> Box:
    x1, y1, x2, y2 = _scale(box, w, h)
    return (min(round(x1), w - 1), min(round(y1), h - 1), min(round(x2), w - 1), min(round(y2), h - 1))


def _draw_label(draw: ImageDraw.ImageDraw, font: Any, label: str, rect: Box, color: RGB, size: tuple[int, int]) -> None:
    """Filled tag above the box, or just inside it when the box touches the top edge."""
    if len(label) > MAX_DRAWN_LABEL:
        label = label[: MAX_DRAWN_LABEL - 1] + "\u2026"
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    pad = max(1, (bottom - top) // 5)
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    x = max(0, min(rect[0], size[0] - tag_w))
    y = rect[1] - tag_h if rect[1] >= tag_h else max(0, min(rect[1], size[1] - tag_h))
    draw.rectangle((x, y, x + tag_w - 1, y + tag_h - 1), fill=color)
    ink = (0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 140 else (255, 255, 255)
    draw.text((x + pad - left, y + pad - top), label, fill=ink, font=font)


def annotate(image: Image.Image, text: str, out_path: str | os.PathLike[str] | None = None) -> Image.Image:
    """Parse ``text`` against this image's size and draw it; saved to ``out_path`` if given."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    annotated = draw_grounding(image, parse_grounding(text, [image.size]))
    if out_path is not None:
        annotated.save(out_path)
    return annotated
