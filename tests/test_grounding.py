"""Boxes and refs: parsing (never raises), formatting, list format, pixel conversion and drawing."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qwenvl.grounding import (
    PALETTE,
    Box,
    BoxFormat,
    _fetch_all_box_with_ref,
    _fetch_latest_picture,
    box_as_written,
    draw_bbox_on_latest_picture,
    draw_boxes,
    format_box,
    format_boxes,
    from_list_format,
    from_pixels,
    malformed_boxes,
    parse_boxes,
    strip_grounding,
    to_list_format,
    to_pixels,
)

# ------------------------------------------------------------------------------ parse / format


def test_parse_readme_caption() -> None:
    text = ("Generate the caption in English with grounding: Woman<ref> Woman</ref><box>(451,379),(731,806)</box>"
            " and<ref> her dog</ref><box>(219,424),(576,896)</box> playing on the beach<|endoftext|>")
    assert parse_boxes(text) == [Box(451, 379, 731, 806, "Woman"), Box(219, 424, 576, 896, "her dog")]


def test_ref_applies_to_its_run_of_boxes_only() -> None:
    text = "<ref>two dogs</ref><box>(1,2),(3,4)</box>\n<box>(5,6),(7,8)</box> and <box>(9,9),(10,10)</box>"
    assert parse_boxes(text) == [Box(1, 2, 3, 4, "two dogs"), Box(5, 6, 7, 8, "two dogs"), Box(9, 9, 10, 10)]
    # the official helper gives the ref to the first box only
    assert [d.get("ref") for d in _fetch_all_box_with_ref(text.replace("\n", ""))] == ["two dogs", None, None]


@pytest.mark.parametrize(
    "text",
    [
        "<box>(1,2),(3,4)",  # unclosed
        "<box>(1,2),(3)</box>",  # 3 numbers
        "<box>(a,2),(3,4)</box>",  # non-numeric
        "<box>(-1,2),(3,4)</box>",  # negative
        "<box>(1234567,2),(3,4)</box>",  # more than 6 digits
        "<box>(" + "9" * 5000 + ",2),(3,4)</box>",  # int() would refuse this many digits
        "<box>(１,2),(3,4)</box>",  # full-width digit
        "<box><box>(1,2),(3,4)</box>",  # the outer, unclosed tag is skipped
        "</box>(1,2),(3,4)<box>",
        "<ref>x<box>(1,2),(3,4)</box></ref>",
        "",
    ],
)
def test_parse_skips_malformed(text: str) -> None:
    boxes = parse_boxes(text)
    assert all(0 <= v <= 999_999 for b in boxes for v in (b.x1, b.y1, b.x2, b.y2))
    if "<box><box>" in text or "<ref>x<box>" in text:
        assert boxes == [Box(1, 2, 3, 4)]  # the well-formed inner box survives, with no ref
    else:
        assert boxes == []


def test_parse_tolerates_spaces_and_keeps_big_in_range_numbers() -> None:
    assert parse_boxes("<ref>猫</ref> <box>( 0 , 1 ) , ( 1000 , 999 )</box>") == [Box(0, 1, 1000, 999, "猫")]


def test_format_box_and_round_trip() -> None:
    assert format_box(Box(1, 2, 3, 4, "dog")) == "<ref>dog</ref><box>(1,2),(3,4)</box>"
    assert format_box(Box(1, 2, 3, 4)) == "<box>(1,2),(3,4)</box>"
    boxes = [Box(1, 2, 3, 4, "a"), Box(5, 6, 7, 8, "a"), Box(9, 9, 9, 9, "b"), Box(0, 0, 999, 999)]
    text = format_boxes(boxes)
    assert text == ("<ref>a</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>"
                    "<ref>b</ref><box>(9,9),(9,9)</box><box>(0,0),(999,999)</box>")
    # A ref-less box right after a ref run would inherit the ref, so it is not a round trip by itself;
    # with text in between it is.
    assert parse_boxes(format_boxes(boxes[:3]) + " then " + format_box(boxes[3])) == boxes


@pytest.mark.parametrize("fmt", list(BoxFormat))
@pytest.mark.parametrize("box, fragment", [
    (Box(float("nan"), 0, 10, 10, "dog"), "format_box: Box(ref='dog') tuple (nan, 0, 10, 10): coordinates must be "
                                          "finite numbers"),           # was "cannot convert float NaN to integer"
    (Box(0, 0, 1000, 20), "format_box: Box(ref=None) tuple (0, 0, 1000, 20): coordinates must be in [0, 1000)"),
    (Box(-5, 0, 10, 10), "tuple (-5, 0, 10, 10): coordinates must be in [0, 1000)"),
    (Box(900, 2, 100, 4), "tuple (900, 2, 100, 4): needs x1 <= x2 and y1 <= y2"),
])
def test_format_box_refuses_what_from_list_format_refuses(fmt, box, fragment) -> None:
    # format_box writes boxes into prompts (user input): it was writing "(0,0),(1000,20)" as it was.
    with pytest.raises(ValueError) as info:
        format_box(box, fmt)
    assert fragment in str(info.value)
    with pytest.raises(ValueError, match="coordinates|x1 <= x2"):
        format_boxes([Box(1, 2, 3, 4), box], fmt)
    assert box_as_written(Box(1000, 0, 2000, 5), fmt).count("(1000,0),(2000,5)") == 1   # quoting model output


def test_parse_boxes_stays_lenient_on_out_of_range_model_output() -> None:
    text = "<|box_start|>(1000,1000),(2000,2000)<|box_end|><|box_start|>(9,9),(1,1)<|box_end|>"
    assert parse_boxes(text, BoxFormat.QWEN2_VL) == [Box(1000, 1000, 2000, 2000), Box(9, 9, 1, 1)]


def test_format_matches_from_list_format() -> None:
    listed = from_list_format([{"ref": "击掌", "box": [[10, 20, 300, 400]]}])
    assert format_boxes([Box(10, 20, 300, 400, "击掌")]) == listed


def test_unknown_format_is_rejected() -> None:
    with pytest.raises(KeyError):
        parse_boxes("x", fmt="qwen2_vl")  # type: ignore[arg-type]
    assert BoxFormat("qwen_vl") is BoxFormat.QWEN_VL


COORD = st.integers(0, 999)
REF = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="<>"), min_size=1, max_size=8)
SPAN = st.tuples(COORD, COORD).map(sorted)  # format_box refuses swapped corners (x1 > x2): only ordered boxes
BOX = st.builds(lambda xs, ys, ref: Box(xs[0], ys[0], xs[1], ys[1], ref), SPAN, SPAN,
                st.one_of(st.none(), REF.map(str.strip).filter(bool)))


@settings(max_examples=200, deadline=None)
@given(st.lists(BOX, max_size=8))
def test_round_trip_property(boxes: list[Box]) -> None:
    # Separate every box by text so a ref-less box never joins the previous ref's run.
    text = " | ".join(format_box(b) for b in boxes)
    assert parse_boxes(text) == boxes


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_parse_never_raises_on_arbitrary_text(text: str) -> None:
    for box in parse_boxes(text):
        assert isinstance(box, Box)
    strip_grounding(text)


FRAGMENTS = st.sampled_from(["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "(", ")",
                             ",", "1", "999", "-5", "1234567", "3.5", " ", "\n", "dog", "狗", "<", ">", "/", "box"])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(FRAGMENTS, st.text(max_size=3)), max_size=40).map("".join))
def test_parse_never_raises_on_tag_fragments(text: str) -> None:
    for box in parse_boxes(text):
        assert all(isinstance(v, int) and 0 <= v <= 999_999 for v in (box.x1, box.y1, box.x2, box.y2))
        assert box.ref is None or (box.ref == box.ref.strip() and box.ref)


def test_strip_grounding() -> None:
    assert strip_grounding("<ref> Woman</ref><box>(451,379),(731,806)</box> and<ref> her dog</ref>"
                           "<box>(1,2),(3,4)</box><box>(5,6),(7,8)</box> play") == " Woman and her dog play"
    assert strip_grounding("a <box>(1,2),(3,4)</box>b<quad>(1,2),(3,4),(5,6),(7,8)</quad>c") == "a bc"
    assert strip_grounding("streaming <ref>猫</ref><box>(1,2),(3") == "streaming 猫"
    assert strip_grounding("no tags") == "no tags"


# -------------------------------------------------------------------------- official list format


def test_list_format_round_trip() -> None:
    items = [{"image": "a.jpg"}, {"text": "Describe "}, {"ref": "the dog", "box": [[1, 2, 3, 4]]}]
    assert to_list_format(from_list_format(items)) == [
        {"text": "Picture 1: "}, {"image": "a.jpg"}, {"text": "\nDescribe "},
        {"ref": "the dog"}, {"box": "(1,2),(3,4)"},
    ]


def test_list_format_errors() -> None:
    with pytest.raises(ValueError, match="Unclosed"):
        to_list_format("<box>(1,2)")
    with pytest.raises(ValueError, match="disallowed special"):
        to_list_format("<|extra_3|>")
    with pytest.raises(ValueError, match="4 numbers"):
        from_list_format([{"box": [[1, 2, 3]]}])
    with pytest.raises(ValueError, match="4"):
        _fetch_all_box_with_ref("<box>(1,2),(3,4),(5,6)</box>")


@pytest.mark.parametrize("items, fragment", [
    ([{"box": [1, 2, 3, 4]}], "list_format[0]['box'] must be a list of boxes [[x1, y1, x2, y2], ...], got list"),
    ([{"box": None}], "must be a list of boxes"),
    ([{"text": "a"}, {"box": [[900, 2, 100, 4]]}], "list_format[1] box list [900, 2, 100, 4]: needs x1 <= x2"),
    ([{"box": [[0, 0, 1000, 20]]}], "coordinates must be in [0, 1000) (normalised, not pixels"),
    ([{"box": [[-5, 0, 10, 10]]}], "coordinates must be in [0, 1000)"),
    ([{"box": [[float("nan"), 0, 10, 10]]}], "coordinates must be finite numbers"),
    ([{"box": [["1", "2", "3", "4"]]}], "coordinates must be finite numbers"),
    ([{"ref": 5, "box": [[1, 2, 3, 4]]}], "list_format[0]['ref'] must be a string, got int 5"),
    ([{"image": None}], "list_format[0]['image'] (a path or URL) must be a string, got None"),
    ([{"image": "a.png</img>evil.png"}], "contains <img> or </img>"),
    ([{"text": 3}], "list_format[0]['text'] must be a string, got int 3"),
    ("hello", "list_format must be a list of dicts, got 'hello'"),
])
def test_from_list_format_refuses_malformed_elements_by_name(items, fragment) -> None:
    with pytest.raises(ValueError) as info:
        from_list_format(items)
    assert fragment in str(info.value)


def test_from_list_format_keeps_the_official_number_writing() -> None:
    import numpy as np

    assert from_list_format([{"box": [[500.7, 1.2, 999.9, 998], np.array([1, 2, 3, 4])]}]) == \
        "<box>(500,1),(999,998)</box><box>(1,2),(3,4)</box>"


def test_fetch_all_box_with_ref_names_a_non_numeric_box() -> None:
    with pytest.raises(ValueError, match=r"box '\(a,2\),\(3,4\)' is not \(x1,y1\),\(x2,y2\) in integers"):
        _fetch_all_box_with_ref("<box>(a,2),(3,4)</box>")


@pytest.mark.parametrize("response, history, fragment", [
    ("<box>(1,1),(9,9)</box>", "Picture 1: <img>a.png</img>", "history must be a list of (query, response) pairs"),
    ("<box>(1,1),(9,9)</box>", [None], "history[0] must be a (query, response) pair, got None"),
    ("<box>(1,1),(9,9)</box>", [{"q": "a"}], "history[0] must be a (query, response) pair, got dict"),
    (None, [], "response must be a string, got None"),
])
def test_draw_bbox_on_latest_picture_refuses_a_malformed_history(response, history, fragment) -> None:
    with pytest.raises(ValueError) as info:
        draw_bbox_on_latest_picture(response, history, load_image=lambda s: Image.new("RGB", (8, 8)))
    assert fragment in str(info.value)


def test_malformed_boxes_lists_what_parse_boxes_skips() -> None:
    text = "<box>(1,2),(3)</box><box>(1,2),(3,4)</box><box>(-5,0),(1,1)</box><box>(1,2"
    assert malformed_boxes(text) == ["(1,2),(3)", "(-5,0),(1,1)"]
    assert [(b.x1, b.y1, b.x2, b.y2) for b in parse_boxes(text)] == [(1, 2, 3, 4)]
    assert malformed_boxes("<|box_start|>(1,2)<|box_end|>", BoxFormat.QWEN2_VL) == ["(1,2)"]


def test_fetch_latest_picture_without_history() -> None:
    assert _fetch_latest_picture("<img>x.png</img> and <img>y.png</img>", None) == "y.png"
    assert _fetch_latest_picture("nothing", None) is None


# ---------------------------------------------------------------------------- pixel conversion


def test_to_pixels_worked_numbers() -> None:
    box = Box(500, 250, 999, 999)
    assert to_pixels(box, 640, 480) == (320.0, 120.0, 639.36, 479.52)  # drawing: / 1000
    x1, y1, x2, y2 = to_pixels(box, 640, 480, scale=999)  # grounding eval: / 999
    assert (x1, y1, x2, y2) == pytest.approx((320.3203203, 120.1201201, 640.0, 480.0))
    assert to_pixels(Box(0, 0, 0, 0), 640, 480) == (0.0, 0.0, 0.0, 0.0)


def test_to_pixels_orders_and_clamps() -> None:
    assert to_pixels(Box(900, 1200, 100, 0), 100, 50) == (10.0, 0.0, 90.0, 50.0)


def test_from_pixels_worked_numbers() -> None:
    assert from_pixels(320, 120, 640, 480, 640, 480) == Box(500, 250, 999, 999)  # 1000 clamps to 999
    assert from_pixels(320, 120, 640, 480, 640, 480, scale=999) == Box(500, 250, 999, 999)  # 499.5 -> 500
    assert from_pixels(640, 480, -5, 0, 640, 480, ref="r") == Box(0, 0, 999, 999, "r")


@pytest.mark.parametrize("scale", [1000, 999])
@pytest.mark.parametrize("size", [(640, 480), (333, 17), (4000, 3000)])
def test_from_pixels_inverts_to_pixels(scale: int, size: tuple[int, int]) -> None:
    for v in range(1000):
        box = Box(v, v, v, v)
        assert from_pixels(*to_pixels(box, *size, scale=scale), *size, scale=scale) == box


def test_other_scales_are_rejected() -> None:
    with pytest.raises(ValueError, match="999"):
        to_pixels(Box(1, 2, 3, 4), 10, 10, scale=100)


# --------------------------------------------------------------------------------------- drawing

GREY = (128, 128, 128)


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def test_draw_boxes_outline_colour_and_copy() -> None:
    image = Image.new("RGB", (200, 100), GREY)
    boxes = [Box(100, 200, 600, 800, "dog"), Box(700, 100, 950, 900, "cat")]  # -> (20,20,120,80), (140,10,190,90)
    out = draw_boxes(image, boxes)
    assert out.size == image.size and out is not image
    assert image.getpixel((20, 50)) == GREY  # the input is untouched
    assert out.getpixel((20, 50)) == _hex(PALETTE[0])  # left edge of box 1
    assert out.getpixel((190, 50)) == _hex(PALETTE[1])  # right edge of box 2: another ref, another colour
    assert out.getpixel((70, 65)) == GREY  # inside box 1, below the label
    assert out.getpixel((5, 5)) == GREY  # outside every box


def test_draw_cjk_label() -> None:
    image = Image.new("RGB", (300, 300), GREY)
    plain = draw_boxes(image, [Box(100, 100, 900, 900)])
    labelled = draw_boxes(image, [Box(100, 100, 900, 900, "击掌的位置")])
    assert plain.getpixel((60, 40)) == GREY
    area = (33, 33, 120, 60)  # just inside the top-left corner (30, 30)
    assert labelled.crop(area).tobytes() != plain.crop(area).tobytes()


def test_draw_bbox_on_latest_picture(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (120, 80), GREY).save(path)
    load = lambda source: Image.open(source).convert("RGB")  # noqa: E731
    history = [(f"Picture 1: <img>{path}</img>\n框出狗", "ok")]
    response = "<ref>狗</ref><box>(100,100),(500,500)</box>"
    out = draw_bbox_on_latest_picture(response, history, load_image=load)
    assert out is not None and out.size == (120, 80)
    assert out.getpixel((40, 40)) == _hex(PALETTE[0])  # bottom edge: int(500 / 1000 * 80) = 40
    assert draw_bbox_on_latest_picture("no boxes here", history, load_image=load) is None
    assert draw_bbox_on_latest_picture(response, [], load_image=load) is None  # no picture
