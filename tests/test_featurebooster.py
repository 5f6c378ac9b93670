"""FeatureBooster (`xwlearn.matching.featurebooster`) against independent references.

The references are written from the paper's equations (AFT-simple as explicit loops, average precision by sorting) and
from the official `forward` of SJTU-ViSYS/FeatureBooster (`featurebooster.py` at 0260868), transcribed onto the official
state-dict keys. The key manifest `fixtures/featurebooster_official_keys.json` was dumped once in a scratch folder from the
unmodified official module built with every entry of the official `config.yaml` (and compared there with the released
SIFT+Boost-F/B `.pth` files) — it shares no code with the converter under test.
"""
import json, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xwlearn.matching.featurebooster import (FEATUREBOOSTER_CONFIGS, FeatureBooster, aft_mix, binarize, boost, fastap,
    boost_penalty, featurebooster_loss, descriptor_distance, homography_labels, match_labels, mutual_nn, matching_accuracy,
    ransac_inliers, to_gray, orb_bits, pack_bits, detect_and_describe, convert_official_featurebooster,
    load_official_featurebooster, warp_points)

torch.set_num_threads(1)
MANIFEST = json.loads((Path(__file__).parent / 'fixtures' / 'featurebooster_official_keys.json').read_text())
D = torch.float64


# ---------------------------------------------------------------- references
def official_forward(sd, desc, kpts, cfg):
    "FeatureBooster.forward of the official featurebooster.py (one image), on the official keys."
    lin = lambda x, n: x @ sd[f'{n}.weight'].T + sd[f'{n}.bias']
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], sd[f'{n}.weight'], sd[f'{n}.bias'], 1e-6)
    def mlp(x, n, k):
        for i in range(k):
            x = lin(x, f'{n}.{2 * i}')
            if i < k - 1: x = torch.relu(x)
        return x
    x = desc + mlp(desc, 'denc.encoder', len(cfg['descriptor_encoder']) + 1)
    x = x + mlp(kpts, 'kenc.encoder', len(cfg['keypoint_encoder']) + 1)
    x = ln(x, 'layer_norm')
    for i in range(cfg['Attentional_layers']):
        a, f = f'attn_proj.layers.{i}.attn', f'attn_proj.layers.{i}.ffn'
        q, k, v = torch.sigmoid(lin(x, f'{a}.query')), lin(x, f'{a}.key'), lin(x, f'{a}.value')
        k = torch.softmax(k.T, dim=-1).T
        x = ln(lin(q * (k * v).sum(dim=-2, keepdim=True), f'{a}.proj') + x, f'{a}.layer_norm')
        x = ln(lin(torch.relu(lin(x, f'{f}.mlp.0')), f'{f}.mlp.2') + x, f'{f}.layer_norm')
    x = lin(x, 'final_proj')
    if cfg['last_activation'] == 'tanh': x = torch.tanh(x)
    return F.normalize(x, dim=-1) if cfg['l2_normalization'] else x

def exact_ap(dist, pos, neg):
    "AP per row by sorting; ties pessimistic; only positives and negatives are ranked."
    out = []
    for d, p, n in zip(dist.tolist(), pos.bool().tolist(), neg.bool().tolist()):
        items = [(dj, pj) for dj, pj, nj in zip(d, p, n) if pj or nj]
        precs = [sum(q[1] for q in items if q[0] <= dj) / sum(1 for q in items if q[0] <= dj) for dj, pj in items if pj]
        out.append(sum(precs) / len(precs))
    return torch.tensor(out, dtype=dist.dtype)


# ---------------------------------------------------------------- official checkpoints
@pytest.mark.parametrize('name', ['ORB+Boost-B', 'SIFT+Boost-F', 'SIFT+Boost-B', 'SuperPoint+Boost-F'])  # all widths, 3-/4-D geometry, 4/9 layers
def test_manifest_layout_loads_strictly_and_matches_official_forward(name, tmp_path):
    m = MANIFEST['configs'][name]
    assert FEATUREBOOSTER_CONFIGS[name]['n_layers'] == m['config']['Attentional_layers']
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * (0.1 if len(s) > 1 else 1.) for k, s in m['keys'].items()}
    torch.save(sd, tmp_path / f'{name}.pth')
    net = load_official_featurebooster(tmp_path / f'{name}.pth').double()
    assert not net.training and len(net.state_dict()) == len(m['keys'])
    c = m['config']
    desc = torch.randn(40, c['descriptor_dim'], dtype=D, generator=g).sign()
    kp = torch.randn(40, c['keypoint_dim'], dtype=D, generator=g)
    ref = official_forward({k: v.double() for k, v in sd.items()}, desc, kp, c)
    torch.testing.assert_close(net(desc, kp), ref, rtol=0, atol=1e-10)

def test_converter_errors_and_prefix(tmp_path):
    keys = MANIFEST['configs']['ORB+Boost-B']['keys']
    sd = {k: torch.zeros(s) for k, s in keys.items()}
    assert convert_official_featurebooster({f'module.{k}': v for k, v in sd.items()}).keys() == convert_official_featurebooster(sd).keys()
    with pytest.raises(KeyError, match='unexpected key'): convert_official_featurebooster({'backbone.w': torch.zeros(1)})
    bad = dict(sd); bad.pop('final_proj.bias'); torch.save(bad, tmp_path / 'ORB+Boost-B.pth')
    with pytest.raises(RuntimeError, match='head.bias'): load_official_featurebooster(tmp_path / 'ORB+Boost-B.pth')
    with pytest.raises(FileNotFoundError, match='no file'): load_official_featurebooster(tmp_path / 'SIFT+Boost-F.pth')


# ---------------------------------------------------------------- mechanism
def test_aft_mix_equals_loops_and_masks():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(7, 3, dtype=D, generator=g) for _ in range(3))
    ref = torch.empty_like(q)
    for n in range(7):
        for c in range(3):
            w = torch.exp(k[:, c]); ref[n, c] = torch.sigmoid(q[n, c]) * (w * v[:, c]).sum() / w.sum()
    torch.testing.assert_close(aft_mix(q, k, v), ref, rtol=0, atol=1e-12)
    pad = lambda t: torch.cat([t, 50 * torch.ones(2, 3, dtype=D)])[None]
    out = aft_mix(pad(q), pad(k), pad(v), torch.tensor([[True] * 7 + [False] * 2]))
    torch.testing.assert_close(out[0, :7], ref, rtol=0, atol=1e-12)

def test_batched_masked_forward_equals_per_image():
    torch.manual_seed(2)
    net = FeatureBooster.from_config('SIFT+Boost-F', n_layers=2).double()
    d1, d2 = F.normalize(torch.randn(5, 128, dtype=D), dim=-1), F.normalize(torch.randn(3, 128, dtype=D), dim=-1)
    k1, k2 = torch.randn(5, 4, dtype=D), torch.randn(3, 4, dtype=D)
    z = lambda t, n: torch.cat([t, torch.zeros(n, t.shape[1], dtype=D)])
    out = net(torch.stack([d1, z(d2, 2)]), torch.stack([k1, z(k2, 2)]), torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
    torch.testing.assert_close(out[0], net(d1, k1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1, :3], net(d2, k2), rtol=0, atol=1e-12)

def test_binarize_straight_through():
    t = torch.tensor([-2., -1e-3, 0., 0.5], dtype=D, requires_grad=True)
    b = binarize(t); (b * torch.arange(4.)).sum().backward()
    assert b.tolist() == [-1., -1., 1., 1.]
    assert t.grad.tolist() == [0., 2., 4., 6.]                     # official: (t + (H(t) − t).detach())·2 − 1 → gradient 2

@pytest.mark.parametrize('seed', range(5))
def test_fastap_equals_sorted_ap_on_bin_centres(seed):
    g = torch.Generator().manual_seed(seed)
    R, M, B, dmax = 5, 30, 10, 128.
    dist = torch.randint(0, B + 1, (R, M), generator=g).to(D) * dmax / B
    pos = (torch.rand(R, M, generator=g) < 0.2).to(D); pos[:, seed] = 1
    neg = (1 - pos) * (torch.rand(R, M, generator=g) < 0.7).to(D)
    torch.testing.assert_close(fastap(dist, pos, neg, B, dmax), exact_ap(dist, pos, neg), rtol=0, atol=1e-12)

def test_fastap_gradcheck_and_errors():
    g = torch.Generator().manual_seed(3)
    d = (torch.rand(2, 9, dtype=D, generator=g) * 3.6 + 0.2).requires_grad_()
    pos = torch.zeros(2, 9, dtype=D); pos[:, :2] = 1
    assert torch.autograd.gradcheck(lambda t: fastap(t, pos, 1 - pos, 10, 4.), (d,))
    with pytest.raises(ValueError, match='every row needs a positive'): fastap(d.detach(), pos * 0, 1 - pos)
    with pytest.raises(ValueError, match='one shape'): fastap(d.detach(), pos[:1], 1 - pos)

def test_boost_penalty_and_loss():
    raw = torch.tensor([0.5, 0.8], dtype=D)
    assert boost_penalty(raw, raw + 0.1).item() == 0.
    torch.testing.assert_close(boost_penalty(raw, torch.tensor([0.25, 0.8], dtype=D)), torch.tensor(0.5, dtype=D))
    torch.testing.assert_close(featurebooster_loss(torch.tensor([0.25, 0.8], dtype=D), raw), torch.tensor(1 - 0.525 + 5, dtype=D))

def test_hamming_distance_is_popcount():
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 256, (4, 32), dtype=np.uint8), rng.integers(0, 256, (6, 32), dtype=np.uint8)
    ref = np.array([[np.unpackbits(x ^ y).sum() for y in b] for x in a])
    assert (descriptor_distance(orb_bits(a), orb_bits(b), True).numpy() == ref).all()
    assert (pack_bits(orb_bits(a)) == a).all()

def test_labels_and_matching_metrics():
    H = torch.tensor([[1., 0, 5], [0, 1, -2], [0, 0, 1]], dtype=D)
    xy1 = torch.tensor([[10., 10], [30, 30], [95, 50]])
    xy2 = torch.tensor([[15., 8], [35, 31], [80, 80]])            # 0 lands exactly, 1 at 3 px (L∞), 2 leaves the image
    ids, pos, neg = homography_labels(xy1, xy2, H, (100, 100))
    assert ids.tolist() == [0, 1] and pos.tolist() == [[1, 0, 0], [0, 1, 0]]
    assert neg.tolist() == [[0, 1, 1], [1, 0, 1]]
    ids, _, _ = match_labels(warp_points(H, xy1), torch.tensor([False, True, True]), xy2)
    assert ids.tolist() == [1]
    m = mutual_nn(torch.eye(3), torch.eye(3)[[2, 0, 1]], False)
    assert m.tolist() == [[0, 1], [1, 2], [2, 0]]
    acc = matching_accuracy(xy1, xy2, torch.tensor([[0, 0], [1, 1], [2, 2]]), H, (0.5, 1.5, 100))
    assert acc == pytest.approx([1 / 3, 1 / 3, 1.])             # errors 0, 3, 37.7 px

def test_mutual_nn_brute_force():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(20, 8, generator=g), torch.randn(15, 8, generator=g)
    d = torch.cdist(a, b)
    ref = [[i, int(d[i].argmin())] for i in range(20) if int(d[:, int(d[i].argmin())].argmin()) == i]
    assert mutual_nn(a, b, False).tolist() == ref


# ---------------------------------------------------------------- bad input and OpenCV
def test_bad_input_errors():
    net = FeatureBooster.from_config('ORB+Boost-B', n_layers=1)
    d, k = torch.randn(10, 256).sign(), torch.randn(10, 4)
    assert net(d[:0], k[:0]).shape == (0, 256) and boost(net, d[:0], k[:0]).shape == (0, 256)
    with pytest.raises(ValueError, match=r'desc: expected shape \(N, 256\)'): net(d[:, :128], k)
    with pytest.raises(ValueError, match='same keypoints'): net(d, k[:3])
    with pytest.raises(TypeError, match='floating'): net(d.to(torch.uint8), k)
    with pytest.raises(ValueError, match='one descriptor width'): mutual_nn(d, d[:, :128], True)
    assert mutual_nn(d[:0], d, True).shape == (0, 2)
    assert matching_accuracy(k[:, :2], k[:, :2], torch.zeros(0, 2, dtype=torch.long), torch.eye(3)) == [0., 0., 0.]
    with pytest.raises(ValueError, match=r'image: expected shape \(H, W\)'): to_gray(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match='image: expected uint8 or float'): to_gray(np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match='name: expected one of'): FeatureBooster.from_config('ORB')

def test_opencv_gray_colour_and_empty():
    cv2 = pytest.importorskip('cv2')
    rng = np.random.default_rng(6)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8), (5, 5), 0)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    a, b = detect_and_describe(rgb, 'orb', 300), detect_and_describe(gray, 'orb', 300)
    assert len(a['xy']) == len(b['xy']) > 0 and a['desc'].shape[1] == 256
    s = detect_and_describe(rgb.astype(np.float32) / 255, 'sift', 100)
    assert s['desc'].shape[1] == 128 and torch.allclose(s['desc'].norm(dim=1), torch.ones(len(s['desc'])))
    e = detect_and_describe(np.full((50, 50), 128, np.uint8), 'sift')
    assert e['xy'].shape == (0, 2) and e['desc'].shape == (0, 128) and e['geom'].shape == (0, 4)
    m = mutual_nn(e['desc'], s['desc'], False)
    assert m.shape == (0, 2) and ransac_inliers(e['xy'], s['xy'], m) == 0

def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, 'cv2', None)
    with pytest.raises(ImportError, match=r"xwlearn\[matching\]"): detect_and_describe(np.zeros((8, 8), np.uint8))

def test_module_imports_without_extras(monkeypatch):
    "The method module needs torch (and numpy) only: with the extras' packages unimportable it still imports and builds."
    import importlib
    for m in ('cv2', 'skimage', 'skimage.data', 'h5py', 'matplotlib', 'sklearn'): monkeypatch.setitem(sys.modules, m, None)
    monkeypatch.delitem(sys.modules, 'xwlearn.matching.featurebooster')
    fb = importlib.import_module('xwlearn.matching.featurebooster')
    assert fb.FeatureBooster.from_config('ORB+Boost-B').out_dim == 256
