"""The parameter layout has one definition, empssl/augment/params.py; the C++ header is generated from it."""

import os

from empssl.augment import params as AP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COLUMNS = (
    "CROP_TOP",
    "CROP_LEFT",
    "CROP_HEIGHT",
    "CROP_WIDTH",
    "FLIP",
    "JITTER",
    "BRIGHTNESS",
    "CONTRAST",
    "SATURATION",
    "HUE",
    "ORDER_0",
    "ORDER_1",
    "ORDER_2",
    "ORDER_3",
    "GRAYSCALE",
    "BLUR_SIGMA",
    "SOLARIZE",
)


def test_committed_header_is_the_generated_one():
    # setup.py rewrites it before a build; a hand edit or a stale commit fails here
    with open(os.path.join(ROOT, AP.HEADER_PATH), encoding="utf-8") as f:
        assert f.read() == AP.c_header(), "csrc/include/augment_layout.h is stale: run setup.py build_ext"


def test_header_defines_every_constant_once():
    text = AP.c_header()
    for name, value in AP.constants().items():
        assert text.count(f"constexpr int {name} = ") == 1 and f"constexpr int {name} = {value};" in text


def test_columns_tile_the_row_and_ops_are_distinct():
    assert sorted(getattr(AP, name) for name in COLUMNS) == list(range(AP.NUM_PARAMS))
    ops = [AP.OP_BRIGHTNESS, AP.OP_CONTRAST, AP.OP_SATURATION, AP.OP_HUE]
    assert sorted(ops) == list(range(AP.NUM_JITTER_OPS))
    assert AP.ORDER_3 - AP.ORDER_0 + 1 == AP.NUM_JITTER_OPS


def test_write_c_header_rewrites_only_a_differing_file(tmp_path):
    os.makedirs(tmp_path / os.path.dirname(AP.HEADER_PATH))
    assert AP.write_c_header(str(tmp_path)) is True
    assert AP.write_c_header(str(tmp_path)) is False
    (tmp_path / AP.HEADER_PATH).write_text("stale")
    assert AP.write_c_header(str(tmp_path)) is True
    assert (tmp_path / AP.HEADER_PATH).read_text() == AP.c_header()
