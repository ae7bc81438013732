"""Tests for deepseek_vl.grounding: parsing (well-formed, malformed, fuzzed) and drawing."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image, ImageDraw

from deepseek_vl.grounding import (
    GroundingBox,
    GroundingResult,
    annotate,
    draw_grounding,
    label_colors,
    label_font,
    parse_grounding,
    strip_grounding_markup,
)

GIRAFFE = "<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>"
CAPTION = (
    "<|ref|>A man<|/ref|><|det|>[[10, 20, 300, 400]]<|/det|> rides "
    "<|ref|>two horses<|/ref|><|det|>[[400, 500, 600, 700], [650, 500, 900, 710]]<|/det|> "
    "near <|ref|>a fence<|/ref|><|det|>[[0, 800, 999, 999]]<|/det|>."
)


def kept(result: GroundingResult) -> list[tuple[str, tuple[int, int, int, int]]]:
    return [(b.label, b.box) for b in result.boxes]


# --- well-formed answers -------------------------------------------------------------------


def test_single_box() -> None:
    result = parse_grounding(GIRAFFE)
    assert kept(result) == [("The giraffe at the back.", (580, 270, 999, 900))]
    assert result.text == "The giraffe at the back."
    assert result.problems == []
    assert result.boxes[0].pixels is None
    assert result.boxes[0].image_index == 0


def test_multiple_boxes_for_one_ref() -> None:
    result = parse_grounding("<|ref|>cats<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7, 8]]<|/det|>")
    assert kept(result) == [("cats", (1, 2, 3, 4)), ("cats", (5, 6, 7, 8))]
    assert result.problems == []


def test_grounded_captioning() -> None:
    result = parse_grounding("<|grounding|>" + CAPTION)
    assert kept(result) == [
        ("A man", (10, 20, 300, 400)),
        ("two horses", (400, 500, 600, 700)),
        ("two horses", (650, 500, 900, 710)),
        ("a fence", (0, 800, 999, 999)),
    ]
    assert result.text == "A man rides two horses near a fence."
    assert result.problems == []


def test_det_without_ref_uses_default_label() -> None:
    text = "<|det|>[[1, 2, 3, 4]]<|/det|>"
    assert kept(parse_grounding(text)) == [("", (1, 2, 3, 4))]
    result = parse_grounding(text, default_label="giraffe")
    assert kept(result) == [("giraffe", (1, 2, 3, 4))]
    assert result.problems == [] and result.text == ""


def test_ref_labels_only_the_next_det() -> None:
    text = "<|ref|>dog<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|><|det|>[[5, 6, 7, 8]]<|/det|>"
    assert kept(parse_grounding(text, default_label="x")) == [("dog", (1, 2, 3, 4)), ("x", (5, 6, 7, 8))]


def test_pixel_conversion() -> None:
    box = parse_grounding(GIRAFFE, [(724, 1086)]).boxes[0]
    assert box.pixels == pytest.approx((420.34034, 293.51351, 724.0, 978.37838))
    assert box.pixels == pytest.approx((580 / 999 * 724, 270 / 999 * 1086, 724.0, 900 / 999 * 1086))


def test_pixels_use_selected_image() -> None:
    box = parse_grounding(GIRAFFE, [(724, 1086), (999, 1998)], image_index=1).boxes[0]
    assert box.image_index == 1
    assert box.pixels == pytest.approx((580.0, 540.0, 999.0, 1800.0))


def test_to_dict_is_json() -> None:
    data = json.loads(json.dumps(parse_grounding(GIRAFFE, [(724, 1086)]).to_dict()))
    assert data["text"] == "The giraffe at the back."
    assert data["problems"] == []
    assert data["boxes"][0]["box"] == [580, 270, 999, 900]
    assert data["boxes"][0]["label"] == "The giraffe at the back."
    assert data["boxes"][0]["image_index"] == 0
    assert data["boxes"][0]["pixels"][2] == pytest.approx(724.0)
    assert parse_grounding("<|det|>[[1,2,3,4]]<|/det|>").to_dict()["boxes"][0]["pixels"] is None


def test_strip_markup() -> None:
    assert strip_grounding_markup(GIRAFFE) == "The giraffe at the back."
    assert strip_grounding_markup("<|grounding|>" + CAPTION) == "A man rides two horses near a fence."
    assert strip_grounding_markup("no markup at all") == "no markup at all"
    assert strip_grounding_markup("cut <|det|>[[1, 2") == "cut"


# --- malformed answers ---------------------------------------------------------------------

B = (1, 2, 3, 4)

MALFORMED = [
    # (model output, boxes kept, problems expected)
    ("<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]", [("cat", B)], True),  # det never closed
    ("<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7, 8", [("cat", B)], True),  # truncated
    ("<|ref|>cat<|/ref|><|det|>[[10, 20, 30, 4", [], True),  # truncated mid-number
    ("<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/de", [("cat", B)], True),  # cut-off closing tag
    ("<|ref|>ca", [], True),  # ref never closed
    ("<|", [], True),  # only a tag fragment
    ("<|ref|>cat<|det|>[[1, 2, 3, 4]]<|/det|>", [("cat", B)], True),  # ref closed by det
    ("<|det|>[[1, 2, 3, 4]]<|det|>[[5, 6, 7, 8]]<|/det|>", [("", B), ("", (5, 6, 7, 8))], True),
    ("cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>", [("", B)], True),  # stray closing ref
    ("hello<|/det|>", [], True),  # stray closing det
    ("<|det|>[[5, 6]]<|/det|>", [], True),  # point, not a box
    ("<|det|>[[1, 2, 3, 4, 5]]<|/det|>", [], True),  # five numbers
    ("<|det|>[[1, 2, 3], [1, 2, 3, 4]]<|/det|>", [("", B)], True),  # odd count, then good box
    ("<|det|>[[-5, 10, 20, 30]]<|/det|>", [("", (0, 10, 20, 30))], True),  # negative clamped
    ("<|det|>[[10, 10, 1500, 999]]<|/det|>", [("", (10, 10, 999, 999))], True),  # > 999 clamped
    ("<|det|>[[1, 2, 3, " + "9" * 400 + "]]<|/det|>", [("", (1, 2, 3, 999))], True),  # huge
    ("<|det|>[[10.4, 10.6, 20, 30]]<|/det|>", [("", (10, 11, 20, 30))], True),  # floats rounded
    ("<|det|>[[300, 10, 100, 20]]<|/det|>", [("", (100, 10, 300, 20))], True),  # x1 > x2 swapped
    ("<|det|>[[10, 300, 20, 100]]<|/det|>", [("", (10, 100, 20, 300))], True),  # y1 > y2 swapped
    ("<|det|>[]<|/det|>", [], True),  # empty list
    ("<|det|>[[]]<|/det|>", [], True),  # empty box
    ("<|det|><|/det|>", [], True),  # empty tag
    ("<|det|>[[1, 2, 3, 4]<|/det|>", [("", B)], True),  # missing bracket
    ("<|det|>[1, 2, 3, 4]]<|/det|>", [("", B)], True),  # extra bracket
    ("<|det|>][1, 2, 3, 4][<|/det|>", [("", B)], True),  # brackets inverted outside the box
    ("<|det|>[[1, 2, 3, 4]] oops<|/det|>", [("", B)], True),  # garbage after boxes
    ("<|det|>1, 2, 3, 4<|/det|>", [], True),  # numbers without brackets
    ("<|det|>[[1, two, 3, 4]]<|/det|>", [], True),  # not a number
    ("<|det|>[[1e3, 2, 3, 4]]<|/det|>", [], True),  # exponent is not a coordinate
    ("<|det|>[[nan, 2, 3, 4]]<|/det|>", [], True),
    ("<|det|>[[1, 2, 3, 4], [1, 2, 3, - 4]]<|/det|>", [("", B)], True),  # lone minus sign
    ("<|det|>[[[1, 2, 3, 4]]]<|/det|>", [("", B)], False),  # redundant nesting tolerated
    ("<|det|>[1, 2, 3, 4]<|/det|>", [("", B)], False),  # single-level list tolerated
    ("<|det|>[[1 2 3 4]]<|/det|>", [("", B)], False),  # spaces as separators tolerated
    ("<|det|>[[+1, 2.0, 3, 4]]<|/det|>", [("", B)], False),  # integral float / plus sign
    ("<|ref|>cat<|/ref|> ~~ <|det|>[[1, 2, 3, 4]]<|/det|>", [("cat", B)], False),  # text between
]


@pytest.mark.parametrize(("text", "boxes", "has_problems"), MALFORMED)
def test_malformed(text: str, boxes: list, has_problems: bool) -> None:
    result = parse_grounding(text, [(640, 480)])
    assert kept(result) == boxes
    assert bool(result.problems) == has_problems, result.problems
    assert all(isinstance(p, str) and p for p in result.problems)
    assert "<|det|>" not in result.text and "<|ref|>" not in result.text


def test_every_prefix_of_a_caption_parses() -> None:
    """Generation can stop at any character; each prefix yields a subset of the full boxes."""
    full = kept(parse_grounding(CAPTION))
    for end in range(len(CAPTION) + 1):
        result = parse_grounding(CAPTION[:end])
        got = kept(result)
        assert got == full[: len(got)], CAPTION[:end]


def test_problem_messages_are_short_for_garbage() -> None:
    result = parse_grounding("<|det|>[[" + "x" * 10_000 + "]]<|/det|>")
    assert result.boxes == [] and result.problems
    assert max(len(p) for p in result.problems) < 200


ALPHABET = [
    "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|", "|>", "[", "]", "[[", "]]",
    ", ", ",", " ", "-", ".", "+", "e", "\n", "cat", "dog", "0", "5", "42", "999", "1000", "123456",
    "<|ref", "det|>",
]  # fmt: skip


def test_fuzz_never_raises_and_boxes_in_range() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        pieces = (rng.choice(ALPHABET) if rng.random() < 0.8 else str(rng.randint(-2000, 2000)) for _ in range(40))
        text = "".join(pieces)[: rng.randint(0, 200)]
        result = parse_grounding(text, [(rng.randint(1, 3000), rng.randint(1, 3000))])
        json.dumps(result.to_dict())
        for b in result.boxes:
            assert all(isinstance(v, int) and 0 <= v <= 999 for v in b.box), (text, b)
            assert b.box[0] <= b.box[2] and b.box[1] <= b.box[3], (text, b)
            assert b.pixels is not None and all(p >= 0 for p in b.pixels)


# --- caller mistakes raise -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"text": None}, TypeError),
        ({"text": b"<|det|>"}, TypeError),
        ({"text": "", "image_sizes": (724, 1086)}, TypeError),  # a bare size, not a list of sizes
        ({"text": "", "image_sizes": "724x1086"}, TypeError),
        ({"text": "", "image_sizes": [(724,)]}, TypeError),
        ({"text": "", "image_sizes": [("a", "b")]}, TypeError),
        ({"text": "", "default_label": None}, TypeError),
        ({"text": "", "image_sizes": [(724, 1086)], "image_index": "0"}, TypeError),
        ({"text": "", "image_sizes": [(0, 10)]}, ValueError),
        ({"text": "", "image_sizes": [(724, 1086)], "image_index": 1}, ValueError),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_grounding(**kwargs)


def test_draw_bad_arguments_raise() -> None:
    image = Image.new("RGB", (10, 10))
    with pytest.raises(TypeError):
        draw_grounding("image.png", [])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        draw_grounding(image, [("cat", (1, 2, 3, 4))])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        draw_grounding(image, [], width=0)
    with pytest.raises(TypeError):
        annotate(None, GIRAFFE)  # type: ignore[arg-type]


# --- drawing -------------------------------------------------------------------------------

BOX = "<|ref|>cat<|/ref|><|det|>[[100, 200, 800, 700]]<|/det|>"  # pixels 20,20 .. 160,70 on 200x100


def test_draw_marks_border_and_leaves_input_alone() -> None:
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    before = image.tobytes()
    out = draw_grounding(image, parse_grounding(BOX, [image.size]), width=2)
    color = label_colors(["cat"])["cat"]
    assert out is not image and out.size == image.size and out.mode == "RGB"
    assert image.tobytes() == before
    for xy in [(20, 45), (21, 45), (160, 45), (90, 70), (90, 69)]:  # left, right, bottom borders
        assert out.getpixel(xy) == color, xy
    assert out.getpixel((90, 45)) == (128, 128, 128)  # inside stays untouched
    assert out.getpixel((5, 90)) == (128, 128, 128)  # outside too
    assert any(out.getpixel((x, y)) == color for x in range(20, 60) for y in range(0, 19))  # label above


def test_draw_label_inside_when_box_touches_top() -> None:
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    out = draw_grounding(image, [GroundingBox("cat", (100, 0, 800, 700))])
    color = label_colors(["cat"])["cat"]
    assert any(out.getpixel((x, 5)) == color for x in range(25, 60))  # filled tag inside the box


def test_draw_distinct_colours_and_image_index() -> None:
    boxes = [GroundingBox("a", (0, 0, 400, 400)), GroundingBox("b", (500, 500, 999, 999)),
             GroundingBox("c", (0, 0, 999, 999), image_index=1)]  # fmt: skip
    colors = label_colors(b.label for b in boxes)
    assert len(set(colors.values())) == 3
    out = draw_grounding(Image.new("RGB", (200, 100)), boxes, width=1)
    assert out.getpixel((0, 20)) == colors["a"]
    assert out.getpixel((199, 75)) == colors["b"]
    assert out.getpixel((199, 20)) == (0, 0, 0)  # box of image 1 not drawn on image 0


def test_rgba_input_gives_rgb_output() -> None:
    image = Image.new("RGBA", (200, 100), (10, 20, 30, 100))
    before = image.tobytes()
    out = draw_grounding(image, parse_grounding(BOX))
    assert out.mode == "RGB" and out.size == (200, 100)
    assert image.mode == "RGBA" and image.tobytes() == before


def test_annotate_saves_and_reloads(tmp_path) -> None:
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    path = tmp_path / "annotated.png"
    out = annotate(image, BOX, path)
    with Image.open(path) as reloaded:
        assert reloaded.size == (200, 100)
        assert reloaded.convert("RGB").tobytes() == out.tobytes()
    assert out.getpixel((90, 70)) == label_colors(["cat"])["cat"]
    assert annotate(image, "no boxes here").tobytes() == image.tobytes()


def test_removed_tags_never_rebuild_markup() -> None:
    assert strip_grounding_markup("<|de<|grounding|>t|>") == ""
    assert strip_grounding_markup("a <|re<|de<|grounding|>t|>f|> b") == "a  b"
    assert strip_grounding_markup("x <| y |> z") == "x <| y |> z"  # not a tag: kept as written


def test_boxes_entirely_outside_the_range_are_dropped_and_reported() -> None:
    result = parse_grounding("<|det|>[[1200, 1300, 1500, 1600], [-9, -9, -1, -1], [990, 10, 1500, 20]]<|/det|>")
    assert [b.box for b in result.boxes] == [(990, 10, 999, 20)]
    assert sum("entirely outside" in p for p in result.problems) == 2


def test_draw_truncates_huge_labels() -> None:
    image = Image.new("RGB", (64, 48))
    drawn = draw_grounding(image, [GroundingBox("x" * 1_000_000, (0, 0, 500, 500))])
    assert drawn.size == image.size and drawn.getbbox() is not None


def test_labels_beyond_latin_are_drawn_with_their_glyphs() -> None:
    """The letter é must not come out as the missing-glyph box (Pillow's own font has plain Latin letters only)."""

    def drawn(text: str) -> bytes:
        image = Image.new("L", (60, 40))
        ImageDraw.Draw(image).text((0, 0), text, font=label_font(20), fill=255)
        return image.tobytes()

    assert drawn("é") != drawn("\u0378")  # U+0378 has a glyph in no font
