"""Fine-tuning data: JSONL conversations read, checked and normalised to the processor's message format.

A row is one conversation, in either layout:

- this package's: ``{"messages": [{"role": "user", "content": "<image>\\n...", "images": ["a.jpg"]},
  {"role": "assistant", "content": "..."}]}`` (multi-turn, text-only, several images);
- ms-swift / ShareGPT: ``{"messages": [...], "images": ["a.jpg", ...]}`` with the images filling the ``<image>``
  tags in order (``{"from": "human" | "gpt", "value": ...}`` turns are accepted too), and a top-level
  ``"system": "..."`` as the system message (ms-swift's sharegpt layout has it).

An assistant turn may carry ``"boxes": [{"label": "cat", "box_pixels": [x1, y1, x2, y2], "image": 0}]``: each box is
written after the turn's text as ``<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>`` in the model's 0..999
coordinates, exactly as the model emits it (``deepseek_vl.grounding.parse_grounding`` reads it back).

Every problem is reported with its line number; nothing is silently dropped, and an unknown key is an error (a
typo such as ``"bboxes"`` or ``"image"`` would otherwise train on a row missing what it meant to give).
"""

from __future__ import annotations

import codecs
import difflib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from deepseek_vl.grounding import MAX_COORD

IMAGE_TAG = "<image>"
ROLE_NAMES = {
    "user": "user", "human": "user", "<|User|>": "user",
    "assistant": "assistant", "gpt": "assistant", "<|Assistant|>": "assistant",
    "system": "system",
}  # fmt: skip
ROW_KEYS = ("messages", "images", "system")
MESSAGE_KEYS = ("role", "content", "from", "value", "images", "boxes")
SHOWN_PROBLEMS = 20


class DataError(ValueError):
    """One or more bad rows; the message lists each with its file and line number."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        more = len(problems) - SHOWN_PROBLEMS
        tail = f"\n  ... and {more} more (deepseek-vl2 finetune --validate lists them all)" if more > 0 else ""
        super().__init__(f"{len(problems)} bad row(s):\n  " + "\n  ".join(problems[:SHOWN_PROBLEMS]) + tail)


@dataclass
class Example:
    """One conversation ready for the processor: roles user/assistant/system, image paths resolved."""

    messages: list[dict[str, Any]]
    line: int
    source: str

    @property
    def images(self) -> list[str]:
        return [path for message in self.messages for path in message.get("images", [])]


def grounding_text(label: str, boxes_pixels: list[list[float]], image_size: tuple[int, int]) -> str:
    """``<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`` with pixels mapped to 0..999 of the image.

    The inverse of the model's convention (pixel = value / 999 * size, see deepseek_vl.grounding). The label is plain
    text: markup in it (``<|ref|>``, ``<|det|>``...) would end the reference early and teach broken answers.
    """
    if "<|" in label:
        raise ValueError(f"label {label!r} contains the token markup '<|': a label is plain text")
    width, height = image_size
    coords = []
    for x1, y1, x2, y2 in boxes_pixels:
        scaled = (x1 / width, y1 / height, x2 / width, y2 / height)
        coords.append("[" + ", ".join(str(min(MAX_COORD, max(0, round(v * MAX_COORD)))) for v in scaled) + "]")
    return f"<|ref|>{label}<|/ref|><|det|>[{', '.join(coords)}]<|/det|>"


def read_jsonl(path: str | Path, check_images: bool = True) -> list[Example]:
    """All rows of a JSONL file, or a DataError listing every bad row (line numbers from 1).

    Images are checked to exist and to have a readable header (their size places boxes); the full decode happens
    when the rows are tokenised (collate.check_rows, which finetune runs on every row before loading the model).
    """
    examples, problems = scan_jsonl(path, check_images)
    if problems:
        raise DataError(problems)
    return examples


def scan_jsonl(path: str | Path, check_images: bool = True) -> tuple[list[Example], list[str]]:
    """The good rows and a "file:line: problem" for each bad one, so that one pass reports them all.

    Each line is decoded on its own (a stray non-UTF-8 byte spoils only its row); a UTF-8 BOM opening the file, as
    some Windows editors write, is skipped.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data {str(path)!r} is a folder; pass the JSONL file itself")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    examples, problems = [], []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                problems.append(
                    f"{path}:{number}: not UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the "
                    "line); save the file as UTF-8"
                )
                continue
            if not text.strip():
                continue
            try:
                examples.append(parse_row(text, number, path.absolute().parent, check_images, source=str(path)))
            except ValueError as error:
                problems.append(f"{path}:{number}: {error}")
    if not examples and not problems:
        problems.append(f"{path}: no rows; each line must be one JSON conversation")
    return examples, problems


def parse_row(text: str, line: int, root: Path, check_images: bool = True, source: str = "") -> Example:
    """One JSONL line to an Example; a ValueError says what is wrong with it."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise ValueError('a row must be an object with a non-empty "messages" list')
    check_keys(row, ROW_KEYS, "the row")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError('"system" must be a text (the system message)')
    shared = row.get("images", [])
    if not isinstance(shared, list) or not all(isinstance(p, str) for p in shared):
        raise ValueError('"images" must be a list of image paths')
    messages = [normalise_message(m, i) for i, m in enumerate(row["messages"])]
    per_message = [p for m in messages for p in m.get("images", [])]
    if shared and per_message:
        raise ValueError('give images either per message or in the row\'s "images" list, not both')
    if system is not None:
        if any(m["role"] == "system" for m in messages):
            raise ValueError('give the system message either as "system" or as a system message, not both')
        messages.insert(0, {"role": "system", "content": system, "index": '"system"'})
    check_structure(messages)
    if shared:
        attach_shared_images(messages, shared)
    for message in messages:
        if message["role"] == "user" and message.get("images") and IMAGE_TAG not in message["content"]:
            message["content"] = (IMAGE_TAG + "\n") * len(message["images"]) + message["content"]
        tags, count = message["content"].count(IMAGE_TAG), len(message.get("images", []))
        if message["role"] == "user" and tags != count:
            raise ValueError(f"message {message['index']} has {tags} {IMAGE_TAG} tags but {count} images")
    sizes = resolve_images(messages, root, check_images)
    for message in messages:
        if "boxes" in message:
            message["content"] = message["content"] + boxes_text(message, sizes)
        message.pop("boxes", None)
        message.pop("index")
    return Example(messages, line, source)


def check_keys(entry: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    """An unknown key is a typo or a layout this reader does not know: name it and the nearest known key."""
    for key in entry:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{where} has an unknown key {key!r}; {hint}the keys are {', '.join(known)}")


def normalise_message(message: Any, index: int) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ValueError(f"message {index} must be an object with role and content")
    check_keys(message, MESSAGE_KEYS, f"message {index}")
    role, content = message.get("role", message.get("from")), message.get("content", message.get("value"))
    if role not in ROLE_NAMES:
        raise ValueError(f"message {index} has role {role!r}; use user, assistant or system")
    if not isinstance(content, str):
        raise ValueError(f"message {index} needs a text content, got {type(content).__name__}")
    out = {"role": ROLE_NAMES[role], "content": content, "index": index}
    images = message.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"message {index}: images must be a list of image paths")
    if images:
        if out["role"] != "user":
            raise ValueError(f"message {index} ({out['role']}) has images; only user messages may")
        out["images"] = list(images)
    if "boxes" in message:
        if out["role"] != "assistant":
            raise ValueError(f"message {index}: boxes belong on an assistant message (the answer)")
        out["boxes"] = message["boxes"]
    return out


def check_structure(messages: list[dict[str, Any]]) -> None:
    """[system], user, assistant, user, assistant, ...: the turns the chat template renders and training learns."""
    for message in messages:
        if message["role"] != "user" and IMAGE_TAG in message["content"]:
            where = f"message {message['index']} ({message['role']})"
            raise ValueError(f"{where}: {IMAGE_TAG} may only appear in user messages")
    for message in messages[1:]:
        if message["role"] == "system":
            raise ValueError(f"message {message['index']}: a system message may only come first")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[0]["role"] != "user":
        raise ValueError("the conversation must start with a user message (after an optional system message)")
    for previous, message in itertools.pairwise(turns):
        if message["role"] == previous["role"]:
            raise ValueError(
                f"messages {previous['index']} and {message['index']} are both {message['role']} messages; user and "
                "assistant must alternate (merge the two, or add the missing turn between them)"
            )
    if turns[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant message (the answer to learn)")
    for message in turns:
        if message["role"] == "assistant" and not (message["content"].strip() or message.get("boxes")):
            raise ValueError(f"message {message['index']}: the assistant answer is empty; give it text or boxes")


def attach_shared_images(messages: list[dict[str, Any]], images: list[str]) -> None:
    """ms-swift layout: images fill the user messages' <image> tags in order; with no tags, all go to the first user turn."""
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise ValueError("the row has images but no user message to put them in")
    tags = sum(m["content"].count(IMAGE_TAG) for m in users)
    if tags == 0:
        users[0]["images"] = list(images)
        return
    if tags != len(images):
        raise ValueError(f"the user messages have {tags} {IMAGE_TAG} tags but the row lists {len(images)} images")
    remaining = list(images)
    for message in users:
        count = message["content"].count(IMAGE_TAG)
        if count:
            message["images"], remaining = remaining[:count], remaining[count:]


def resolve_images(messages: list[dict[str, Any]], root: Path, check: bool) -> list[tuple[int, int] | None]:
    """Make image paths absolute (relative ones are relative to the data file); read each size if checking."""
    sizes = []
    for message in messages:
        resolved = []
        for entry in message.get("images", []):
            path = Path(entry).expanduser()
            path = path if path.is_absolute() else root / path
            size = None
            if check:
                if not path.is_file():
                    problem = "is a folder" if path.is_dir() else "not found"
                    raise ValueError(f"image {entry!r} {problem} (looked at {path})")
                try:
                    with Image.open(path) as image:
                        size = image.size
                except OSError as error:
                    raise ValueError(f"image {entry!r} cannot be read: {error}") from None
            resolved.append(str(path))
            sizes.append(size)
        if resolved:
            message["images"] = resolved
    return sizes


def boxes_text(message: dict[str, Any], sizes: list[tuple[int, int] | None]) -> str:
    """The grounding markup of an assistant message's boxes; consecutive boxes of one label share a <|det|>."""
    boxes = message["boxes"]
    where = f"message {message['index']}"
    if not isinstance(boxes, list) or not boxes:
        raise ValueError(f"{where}: boxes must be a non-empty list of {{label, box_pixels}} objects")
    if not sizes:
        raise ValueError(f"{where} has boxes but the conversation has no image")
    groups: list[tuple[str, int, list[list[float]]]] = []
    for number, box in enumerate(boxes):
        if not isinstance(box, dict) or not isinstance(box.get("label"), str) or "box_pixels" not in box:
            raise ValueError(f"{where} box {number}: needs a text label and box_pixels [x1, y1, x2, y2]")
        if "<|" in box["label"]:
            raise ValueError(f"{where} box {number}: label {box['label']!r} contains the token markup '<|': plain text")
        pixels, image = box["box_pixels"], box.get("image", 0 if len(sizes) == 1 else None)
        if image is None or not isinstance(image, int) or not 0 <= image < len(sizes):
            raise ValueError(f"{where} box {number}: give \"image\": 0..{len(sizes) - 1} (which image it is in)")
        size = sizes[image]
        if size is None:
            raise ValueError(f"{where} box {number}: the image size is needed; read the data with check_images")
        if (
            not isinstance(pixels, list) or len(pixels) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pixels)
        ):  # fmt: skip
            raise ValueError(f"{where} box {number}: box_pixels must be 4 numbers [x1, y1, x2, y2], got {pixels!r}")
        x1, y1, x2, y2 = pixels
        if not (0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]):
            raise ValueError(
                f"{where} box {number}: box_pixels {pixels} must satisfy 0 <= x1 < x2 <= {size[0]} and "
                f"0 <= y1 < y2 <= {size[1]} (the image is {size[0]}x{size[1]})"
            )
        if groups and groups[-1][0] == box["label"] and groups[-1][1] == image:
            groups[-1][2].append(pixels)
        else:
            groups.append((box["label"], image, [pixels]))
    return "".join(grounding_text(label, pixels, sizes[image]) for label, image, pixels in groups)
