"""Text4Seg (`xwlearn.seg.text4seg`): semantic descriptors and row-wise RLE against independent references.

The references are written from the official code's behaviour as described in mc-lan/Text4Seg
(`playground/data/create_json/utils.py::encode_mask`: 'label *count' runs joined by '| ', rows by '\\n ', a final
newline; `llava/eval/utils.py::decode_mask`: strip newlines, split rows on '\\n ', runs on '| ', label and count on
' *'), and from PIL's NEAREST resize for the 16×16 grid — they share no code with the module under test.
"""
import importlib, sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck
from PIL import Image

from xwlearn.seg.text4seg import (check_labels, semantic_descriptors, encode_rrle, encode_descriptors, encode_irle,
                                  decode_rrle, decode_irle, RRLEError, seg_answer, extract_seg, mask_from_answer,
                                  referring_iou)

torch.set_num_threads(1)


# ---------------------------------------------------------------- references
def official_encode(label_rows):
    "encode_mask as the official function behaves: rows of label strings -> text."
    rows = []
    for row in label_rows:
        runs, count = [], 1
        for j in range(1, len(row)):
            if row[j] == row[j - 1]: count += 1
            else: runs.append(f"{row[j - 1]} *{count}"); count = 1
        runs.append(f"{row[-1]} *{count}")
        rows.append("| ".join(runs))
    return "\n ".join(rows) + "\n"


def official_decode(text):
    "decode_mask as the official function behaves: text -> flat list of labels."
    out = []
    for row in text.strip("\n").split("\n "):
        for run in row.split("| "):
            label, count = run.split(" *")
            out += [label] * int(count)
    return out


_alphabet = st.characters(blacklist_characters='|\n\r*', blacklist_categories=('Cs', 'Cc'), max_codepoint=0x2FF)
label_st = st.text(_alphabet, min_size=1, max_size=10).filter(lambda s: s == s.strip())


@st.composite
def masks_and_labels(draw, max_side=10):
    labels = draw(st.lists(label_st, min_size=1, max_size=4, unique=True))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    vals = draw(st.lists(st.integers(0, len(labels) - 1), min_size=h * w, max_size=h * w))
    return torch.tensor(vals, dtype=torch.long).reshape(h, w), labels


# ---------------------------------------------------------------- the official format
def test_worked_example():
    m = torch.zeros(3, 16, dtype=torch.long); m[1, 4:10] = 1
    assert encode_rrle(m, ['others', 'white horse']) == "others *16\n others *4| white horse *6| others *6\n others *16\n"


@settings(max_examples=100, deadline=None)
@given(masks_and_labels())
def test_encode_matches_official(ml):
    "Labels without '*' so the official split(' *') is unambiguous: our text is the official text, and it decodes officially."
    m, labels = ml
    text = encode_rrle(m, labels)
    assert text == official_encode([[labels[v] for v in row] for row in m.tolist()])
    assert official_decode(text) == [labels[v] for v in m.flatten().tolist()]


@settings(max_examples=100, deadline=None)
@given(masks_and_labels())
def test_round_trip_all_formats(ml):
    m, labels = ml
    assert torch.equal(decode_rrle(encode_rrle(m, labels), labels, tuple(m.shape)), m)
    assert torch.equal(decode_rrle(encode_descriptors(m, labels), labels, tuple(m.shape)), m)
    assert torch.equal(decode_irle(encode_irle(m, labels), labels, tuple(m.shape)), m)
    bare = encode_rrle(m, labels).replace("\n ", "\n")                       # a bare newline between rows
    assert torch.equal(decode_rrle(bare, labels, tuple(m.shape)), m)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(st.characters(max_codepoint=0x7F), min_size=1, max_size=8), min_size=1, max_size=3, unique=True)
       .filter(lambda ls: all(l == l.strip() and ' *' not in l and '|' not in l and '\n' not in l and '\r' not in l for l in ls)),
       st.integers(1, 6), st.integers(1, 6), st.data())
def test_round_trip_labels_with_star(labels, h, w, data):
    "Labels may hold '*' (not ' *'): the run splits at its last ' *'."
    labels = [l + '*' if i % 2 else '*' + l for i, l in enumerate(labels)]
    m = torch.tensor(data.draw(st.lists(st.integers(0, len(labels) - 1), min_size=h * w, max_size=h * w))).reshape(h, w)
    assert torch.equal(decode_rrle(encode_rrle(m, labels), labels, (h, w)), m)


# ---------------------------------------------------------------- label restrictions
@pytest.mark.parametrize("labels,msg", [
    (['others', 'a|b'], "contains ['|']"), (['others', 'a *b'], "contains [' *']"), (['others', 'a\nb'], "line break"),
    (['others', ' cat'], "leading or trailing"), (['others', 'cat '], "leading or trailing"), (['others', ''], "is empty"),
    (['cat', 'cat'], "distinct"), ([], "at least one")])
def test_label_restrictions(labels, msg):
    with pytest.raises(ValueError, match=msg.replace('[', r'\[').replace(']', r'\]').replace('|', r'\|').replace('*', r'\*')):
        encode_rrle(torch.zeros(2, 2, dtype=torch.long), labels)


def test_label_types():
    with pytest.raises(TypeError, match="list of strings"): check_labels('others')
    with pytest.raises(TypeError, match=r"labels\[1\] must be a str"): check_labels(['others', 1])


def test_mask_errors():
    with pytest.raises(TypeError, match="2-D integer tensor"): encode_rrle(torch.rand(3, 3), ['a'])
    with pytest.raises(TypeError, match="2-D integer tensor"): encode_rrle(torch.zeros(3, dtype=torch.long), ['a'])
    with pytest.raises(ValueError, match=r"label indices 0\.\.1"): encode_rrle(torch.full((2, 2), 2), ['a', 'b'])
    with pytest.raises(ValueError, match="shape must be"): decode_rrle("a *2\n", ['a'], (1, -2))


# ---------------------------------------------------------------- malformed model output
L = ['others', 'cat']


@pytest.mark.parametrize("text,msg", [
    ("others *2| cat *x\n cat *3", "row 0, run 1 .*count 'x'"),
    ("others *2| dog *1\n cat *3", "unknown label 'dog'"),
    ("others *2| cat *2\n cat *3", r"row 0 holds 4 cells \(2 \+ 2\); expected 3"),
    ("others *2| cat *1\n cat *2", r"row 1 holds 2 cells"),
    ("others *3\n cat *3\n cat *3", "3 rows; expected 2"),
    ("others *3", "1 rows; expected 2"),
    ("others *0| cat *3\n cat *3", "a run of 0 cells"),
    ("\n\n", "no runs"),
    ("others *-1| cat *4\n cat *3", "count '-1'")])
def test_strict_errors(text, msg):
    with pytest.raises(RRLEError, match=msg): decode_rrle(text, L, (2, 3))


def test_strict_error_is_value_error():
    assert issubclass(RRLEError, ValueError)
    with pytest.raises(TypeError, match="text must be a str"): decode_rrle(None, L, (2, 3))


@pytest.mark.parametrize("text,expected", [
    ("others *2| dog *1\n cat *3", [[0, 0, 0], [1, 1, 1]]),       # unknown label -> background (official .get(item, 0))
    ("others *2| CAT *1\n cat *3", [[0, 0, 1], [1, 1, 1]]),       # case / spacing differences are matched
    ("others *2| cat *x\n cat *3", [[0, 0, 1], [1, 1, 1]]),       # a bad count is one cell
    ("others *1| cat *1\n cat *99999999999", [[0, 1, 1], [1, 1, 1]]),   # short row extended with its last label; huge count cut
    ("cat *3\n cat *3\n cat *3", [[1, 1, 1], [1, 1, 1]]),         # extra rows dropped
    ("cat *3", [[1, 1, 1], [0, 0, 0]]),                           # missing rows are background
    ("others *0| cat *3\n cat *3", [[1, 1, 1], [1, 1, 1]]),       # an empty run is dropped
    ("", [[0, 0, 0], [0, 0, 0]])])
def test_repair_rules(text, expected):
    assert decode_rrle(text, L, (2, 3), repair=True).tolist() == expected


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(masks_and_labels(8), st.text(max_size=30), st.integers(0, 300), st.sampled_from(['', '|', ' *', '\n', '\n ', '*', ' ', '0', '-']))
def test_malformed_output_never_crashes(ml, junk, at, piece):
    m, labels = ml
    text = encode_rrle(m, labels)
    for t in (junk, text[:at], text[:at] + piece + text[at:], text[:at] + junk + text[at:], text[at:]):
        for dec in (decode_rrle, decode_irle):
            out = dec(t, labels, tuple(m.shape), repair=True)
            assert out.shape == m.shape and out.dtype == torch.long and int(out.min()) >= 0 and int(out.max()) < len(labels)
            try: assert dec(t, labels, tuple(m.shape)).shape == m.shape
            except RRLEError: pass


# ---------------------------------------------------------------- grid, answers, metrics
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70), st.integers(1, 20), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_grid_is_pil_nearest(H, W, h, w, seed):
    m = np.random.default_rng(seed).integers(0, 4, (H, W)).astype(np.uint8)
    ref = np.array(Image.fromarray(m).resize((w, h), Image.NEAREST))
    assert np.array_equal(semantic_descriptors(torch.from_numpy(m), (h, w)).numpy(), ref)


def test_answer_round_trip():
    m = torch.zeros(64, 64, dtype=torch.bool); m[8:40, 16:48] = True            # aligned with the 4-px cells of a 16×16 grid
    for fmt in ('rrle', 'full', 'irle'):
        ans = f"Sure.\n<seg>{seg_answer('the red square', m, fmt=fmt)}</seg>"
        assert torch.equal(mask_from_answer(extract_seg(ans), 'the red square', (64, 64), fmt=fmt, repair=False), m)
    assert extract_seg("no tags") == "no tags" and extract_seg("a <seg>x *1") == "x *1"
    with pytest.raises(RRLEError, match="no '<seg>'"): extract_seg("no tags", strict=True)
    with pytest.raises(ValueError, match="fmt must be one of"): seg_answer('x', m, fmt='poly')


def test_referring_iou():
    a, b = torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)
    a[:2] = True; b[:1] = True                      # IoU 4/8
    c, d = torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)  # IoU 1 on 4 pixels
    r = referring_iou([a, c], [b, d])
    assert r['ciou'] == pytest.approx((4 + 4) / (8 + 4)) and r['miou'] == pytest.approx((0.5 + 1) / 2)
    with pytest.raises(ValueError, match="same length"): referring_iou([a], [])
    with pytest.raises(ValueError, match="shape"): referring_iou([a], [c])


def test_imports_without_extras(monkeypatch):
    "The method module imports with transformers / peft / gguf absent (an import of any of them raises ImportError)."
    for m in ('transformers', 'peft', 'gguf', 'sentence_transformers'): monkeypatch.setitem(sys.modules, m, None)
    monkeypatch.delitem(sys.modules, 'xwlearn.seg.text4seg')
    t = importlib.import_module('xwlearn.seg.text4seg')
    assert t.encode_rrle([[0, 1]], ['others', 'cat']) == "others *1| cat *1\n"
