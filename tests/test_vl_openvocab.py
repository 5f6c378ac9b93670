"Tests of xwlearn.vl.openvocab: label sets, sliding-window invariance, synonym pooling and background threshold, the resize rule, label conventions of every benchmark's fixture, mIoU counting, error messages."
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from xwlearn.vision.datasets import write_fixture
from xwlearn.vision.formats import read_label_png
from xwlearn.vl.openvocab import (BENCHMARKS, CLASS_NAMES, benchmark_samples, classify, evaluate, query_classes, read_sample,
                                  segment, slide_logits, window_logits)

torch.set_num_threads(1)

def test_label_sets():
    assert {k: len(v) for k, v in CLASS_NAMES.items()} == dict(voc20=20, voc21=21, context59=59, context60=60, cocostuff171=171,
                                                               cityscapes19=19, ade150=150)
    for k in ('voc20', 'context59'):                            # both are alphabetical in their dataset definitions
        firsts = [c[0] for c in CLASS_NAMES[k]]; assert firsts == sorted(firsts), k
    assert CLASS_NAMES['voc21'][1:] == CLASS_NAMES['voc20'] and CLASS_NAMES['context60'][1:] == CLASS_NAMES['context59']
    assert [c[0] for c in CLASS_NAMES['cityscapes19']][:3] == ['road', 'sidewalk', 'building'] and CLASS_NAMES['ade150'][-1] == ('flag',)
    assert len(query_classes(CLASS_NAMES['ade150'])) == sum(len(c) for c in CLASS_NAMES['ade150'])

@settings(max_examples=15, deadline=None)
@given(H=st.integers(5, 40), W=st.integers(5, 40), win=st.integers(3, 24), stride=st.integers(1, 24))
def test_slide_equals_whole_image_for_a_pixelwise_encoder(H, W, win, stride):
    stride = min(stride, win)
    g = torch.Generator().manual_seed(H * 100 + W)
    Wp = torch.randn(3, 6, dtype=torch.float64, generator=g)
    img, txt = torch.randn(1, 3, H, W, dtype=torch.float64, generator=g), F.normalize(torch.randn(4, 6, dtype=torch.float64, generator=g), dim=-1)
    dense = lambda x: torch.einsum('bchw,cd->bhwd', x, Wp)
    torch.testing.assert_close(slide_logits(dense, img, txt, window=win, stride=stride, patch=1), window_logits(dense, img, txt, patch=1), rtol=0, atol=1e-12)

def test_window_counts_cover_every_pixel():
    seen = []
    def dense(x): seen.append(tuple(x.shape[-2:])); return torch.ones(1, x.shape[2] // 4, x.shape[3] // 4, 2)
    out = slide_logits(dense, torch.zeros(1, 3, 30, 50), F.normalize(torch.ones(1, 2), dim=-1), window=16, stride=12, patch=4)
    torch.testing.assert_close(out, torch.ones_like(out))       # cosine 1 everywhere after count normalisation
    assert len(seen) == 3 * 4 and set(seen) == {(16, 16)}       # ceil((30-16)/12)+1 = 3 rows, ceil((50-16)/12)+1 = 4 columns

def test_classify_pools_synonyms_after_the_softmax():
    lg = torch.zeros(1, 3, 1, 1); lg[0, :, 0, 0] = torch.tensor([0.30, 0.29, 0.295])
    qc = torch.tensor([0, 1, 1])                                # class 1 has two synonyms; its best one (0.295) < class 0's
    assert classify(lg, qc).item() == 0
    assert classify(lg, torch.tensor([0, 1, 2])).item() == 0 and classify(lg, qc, prob_thd=0.9).item() == 0
    lg[0, 0, 0, 0] = 0.2
    assert classify(lg, qc).item() == 1 and classify(lg, qc, logit_scale=1.0, prob_thd=0.99).item() == 0

def test_segment_resize_rule_and_output_size():
    shapes = []
    def dense(x): shapes.append(tuple(x.shape[-2:])); return torch.ones(1, x.shape[2] // 16, x.shape[3] // 16, 2)
    txt = F.normalize(torch.randn(3, 2), dim=-1)
    out = segment(dense, np.zeros((100, 200, 3), np.uint8), txt, short_side=448, window=None)
    assert shapes == [(448, 896)] and out.shape == (100, 200)
    segment(dense, np.zeros((1024, 2048, 3), np.uint8), txt, short_side=448, max_long=512, window=None)
    assert shapes[-1] == (256, 512)                             # the long-side cap wins: min(512/2048, 448/1024)

@pytest.mark.parametrize("key", sorted(BENCHMARKS))
def test_fixture_labels_and_counting(tmp_path, key):
    b = BENCHMARKS[key]
    root = write_fixture(b.card, tmp_path, n=2)
    pairs = benchmark_samples(key, root)
    assert len(pairs) == 2
    img, lab = read_sample(key, *pairs[0])
    raw = read_label_png(pairs[0][1]).astype(np.int64)
    want = np.where((raw == 0) | (raw == 255), 255, raw - 1) if b.reduce_zero_label else raw
    np.testing.assert_array_equal(lab, want); assert img.shape[:2] == lab.shape
    # a constant encoder predicts one class c everywhere: IoU_c = pixels of c / valid pixels, every other present class 0
    txt = F.normalize(torch.eye(len(query_classes(b.classes)), 4 if len(query_classes(b.classes)) < 4 else len(query_classes(b.classes))), dim=-1)
    dense = lambda x: txt[-1].expand(x.shape[0], x.shape[2] // 16, x.shape[3] // 16, -1)
    r = evaluate(dense, txt, key, root, short_side=64, window=None)
    c = int(query_classes(b.classes)[-1])
    labs = np.concatenate([read_sample(key, *p)[1].ravel() for p in pairs]); labs = labs[labs != 255]
    present = set(np.unique(labs)) | {c}
    assert r['mIoU'] == pytest.approx(((labs == c).sum() / len(labs)) / len(present), abs=1e-12)

def test_errors(tmp_path):
    txt = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="key"): benchmark_samples('pascal', tmp_path)
    with pytest.raises(ValueError, match="Pascal VOC"): benchmark_samples('voc21', tmp_path)
    with pytest.raises(ValueError, match="window"): slide_logits(lambda x: x, torch.zeros(1, 3, 8, 8), txt, window=(4, 0))
    with pytest.raises(ValueError, match="stride"): slide_logits(lambda x: x, torch.zeros(1, 3, 8, 8), txt, window=4, stride=5)
    with pytest.raises(ValueError, match="dense"): window_logits(lambda x: torch.zeros(1, 2, 2, 5), torch.zeros(1, 3, 8, 8), txt)
    with pytest.raises(ValueError, match="crop"): window_logits(lambda x: x, torch.zeros(3, 8, 8), txt)
    with pytest.raises(ValueError, match="image"): segment(lambda x: x, np.zeros((4, 4)), txt)
    root = write_fixture('voc', tmp_path/'voc', n=1)
    with pytest.raises(ValueError, match="text"): evaluate(lambda x: x, txt, 'voc21', root)
    with pytest.raises(ValueError, match="prob_thd"): evaluate(lambda x: x, torch.zeros(len(query_classes(CLASS_NAMES['voc20'])), 4), 'voc20', root, prob_thd=0.5)
