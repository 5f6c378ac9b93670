"""Temporal RoI Align (`xwlearn.detection.temporal_roi_align`) against independent references.

Two references: a per-pixel loop written from the paper's definition (cosine similarity, the K best positions with ties
to the lowest position, softmax over them, weighted sum of the raw features), and the official mmtracking
`TemporalRoIAlign.most_similar_roi_align` / `temporal_attentional_feature_aggregation` transcribed as tensor code
(`topk` based, so it is compared only where the similarities have no ties).

SELSA (`SelsaAggregator`, `SelsaBoxHead`) against mmtracking's `SelsaAggregator.forward` / `SelsaBBoxHead.forward`
transcribed with `bmm`s and permutes, and against a per-proposal loop; the official-checkpoint converter against the key
manifest tests/fixtures/temporal_roi_align_selsa_troi_r50_dc5_keys.json (written from mmtracking's config and code).
"""
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from xwlearn.detection.temporal_roi_align import (most_similar_roi_align, TemporalAttentionAggregation, TemporalRoIAlign,
                                                  sample_ref_frames, cocovid_key_refs, troi_similarity_bytes, SelsaAggregator,
                                                  SelsaBoxHead, TRoIFasterRCNN, troi_r50_dc5, convert_mmtracking_troi)

torch.set_num_threads(1)
D = torch.float64


# ---------------------------------------------------------------- references
def loop_msra(x, f, k):
    "Per RoI pixel and frame: rank positions by (-cosine, position), keep k, softmax, weighted sum."
    n, c, h, w = x.shape; T, _, H, W = f.shape
    out = torch.zeros(T, n, c, h, w, dtype=x.dtype)
    ff = f.flatten(2)
    for t in range(T):
        for r in range(n):
            for i in range(h):
                for j in range(w):
                    q = x[r, :, i, j]
                    sims = [float(q @ ff[t, :, s] / (q.norm() * ff[t, :, s].norm())) for s in range(H * W)]
                    best = sorted(range(H * W), key=lambda s: (-sims[s], s))[:k]
                    wt = torch.tensor([sims[s] for s in best], dtype=x.dtype).softmax(0)
                    out[t, r, :, i, j] = sum(wt[m] * ff[t, :, best[m]] for m in range(k))
    return out


def official_msra(roi_feats, ref_feats, k):
    "mmtracking's most_similar_roi_align, transcribed (topk; a Python loop over frames)."
    q = roi_feats / roi_feats.norm(p=2, dim=1, keepdim=True)
    r = ref_feats / ref_feats.norm(p=2, dim=1, keepdim=True)
    n, c, h, w = q.shape; T, _, H, W = r.shape
    S = q.permute(0, 2, 3, 1).reshape(-1, c).mm(r.permute(1, 0, 2, 3).reshape(c, -1)).view(-1, T, H * W)
    v, idx = S.topk(k=k, dim=2, largest=True)
    v = v.softmax(dim=2)
    rf = ref_feats.permute(2, 3, 0, 1).reshape(-1, T, c)
    out = torch.stack([(rf[idx[:, t], t, :] * v[:, t].unsqueeze(-1)).sum(1) for t in range(T)])
    return out.view(T, n, h, w, c).permute(0, 1, 4, 2, 3)


def official_tafa(embed, x, ref_x, blocks):
    "mmtracking's temporal_attentional_feature_aggregation, transcribed; x (1, n, C, h, w)."
    x = torch.cat((x, ref_x), 0)
    img_n, roi_n, _, h, w = x.shape
    e = embed(x.view(img_n * roi_n, -1, h, w)); c = e.size(1)
    e = e.view(img_n, roi_n, blocks, -1, h, w)
    a = torch.sum(e * e[[0]], dim=3, keepdim=True) / float(c / blocks) ** 0.5
    a = a.expand(-1, -1, -1, c // blocks, -1, -1).contiguous().view(img_n, roi_n, c, h, w).softmax(0)
    return (x * a).sum(0)


# ---------------------------------------------------------------- most-similar RoI align
@pytest.mark.parametrize("k", [1, 2, 3])
def test_oracle_matches_the_per_pixel_loop(k):
    g = torch.Generator().manual_seed(k)
    x, f = torch.randn(2, 5, 3, 3, generator=g, dtype=D), torch.randn(2, 5, 4, 3, generator=g, dtype=D)
    assert torch.allclose(most_similar_roi_align(x, f, k), loop_msra(x, f, k), atol=1e-12)


def test_oracle_matches_the_official_form_without_ties():
    g = torch.Generator().manual_seed(0)
    x, f = torch.randn(4, 16, 7, 7, generator=g, dtype=D), torch.randn(3, 16, 9, 11, generator=g, dtype=D)
    assert torch.allclose(most_similar_roi_align(x, f, 2), official_msra(x, f, 2), atol=1e-12)


def test_ties_go_to_the_lowest_position_and_are_deterministic():
    x = torch.randn(2, 4, 7, 7, dtype=D)
    f = torch.randn(1, 4, 3, 3, dtype=D)
    f[0, :, 2, 1] = f[0, :, 0, 2] = f[0, :, 1, 1] = torch.tensor([1., 1., 1., 1.], dtype=D)   # positions 7, 2, 4: equal
    q = torch.ones(1, 4, 1, 1, dtype=D)                                                      # most similar to all three
    _, idx = most_similar_roi_align(q, f, k=3, return_index=True)
    assert idx[0, 0].tolist() == [2, 4, 7]
    runs = [most_similar_roi_align(x, torch.zeros(2, 4, 5, 5, dtype=D), k=4, return_index=True)[1] for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs) and runs[0].unique(dim=0).tolist() == [[[0, 1, 2, 3]] * 2]


def test_zero_feature_pixels_do_not_give_nan():
    y = most_similar_roi_align(torch.zeros(1, 4, 7, 7), torch.randn(2, 4, 5, 5), 2)
    assert y.isfinite().all()


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 2, generator=g, dtype=D, requires_grad=True)
    f = torch.randn(2, 3, 3, 4, generator=g, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: most_similar_roi_align(a, b, 2), (x, f))


def test_identical_reference_matches_each_pixel_to_itself():
    g = torch.Generator().manual_seed(2)
    feat = torch.randn(1, 32, 16, 20, generator=g, dtype=D)
    boxes = torch.tensor([[0., 0., 7., 7.], [11., 4., 18., 11.], [3., 9., 10., 16.]], dtype=D)
    ex = TemporalRoIAlign(32, sampling_ratio=1).double()
    x = ex.pool({'0': feat}, [boxes], [(16, 20)])
    _, idx = most_similar_roi_align(x, feat, k=1, return_index=True)
    ii, jj = torch.meshgrid(torch.arange(7), torch.arange(7), indexing='ij')
    expect = torch.stack([(int(b[1]) + ii) * 20 + int(b[0]) + jj for b in boxes]).flatten()
    assert torch.equal(idx[:, 0, 0], expect)
    # and the most-similar feature (k=1) is the key RoI feature itself
    assert torch.allclose(most_similar_roi_align(x, feat, k=1)[0], x, atol=1e-12)


@pytest.mark.parametrize("bad, msg", [
    (dict(x=torch.randn(2, 4, 7)), "roi_feats: expected a 4-d Tensor"),
    (dict(f=torch.randn(1, 3, 4, 4)), "ref_feats: expected 4 channels"),
    (dict(k=0), "k: expected an int in [1, H*W=16]"),
    (dict(k=17), "k: expected an int in [1, H*W=16]"),
    (dict(f=[1, 2]), "ref_feats: expected a Tensor"),
])
def test_bad_inputs_name_the_argument(bad, msg):
    a = dict(x=torch.randn(2, 4, 7, 7), f=torch.randn(1, 4, 4, 4), k=2) | bad
    with pytest.raises((ValueError, TypeError), match=msg.replace('[', r'\[').replace(']', r'\]').replace('*', r'\*')):
        most_similar_roi_align(a['x'], a['f'], a['k'])


# ---------------------------------------------------------------- TAFA and the extractor
def test_tafa_matches_the_official_form():
    torch.manual_seed(0)
    agg = TemporalAttentionAggregation(16, 4).double()
    x, ref = torch.randn(5, 16, 7, 7, dtype=D), torch.randn(3, 5, 16, 7, 7, dtype=D)
    with torch.no_grad():
        assert torch.allclose(agg(x, ref), official_tafa(agg.embed, x[None], ref, 4), atol=1e-12)
        assert torch.allclose(TemporalAttentionAggregation(16, 0)(x, ref), torch.cat([x[None], ref]).mean(0), atol=1e-12)


def test_no_references_equals_roi_align():
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 8, 10, 12, generator=g, dtype=D)
    props = [torch.tensor([[0., 0., 50., 40.], [8., 8., 90., 70.]], dtype=D), torch.tensor([[20., 10., 60., 60.]], dtype=D)]
    ex = TemporalRoIAlign(8).double()
    ref = roi_align(feat, props, 7, 1 / 8, 2, aligned=True)
    with torch.no_grad():
        assert torch.equal(ex({'0': feat}, props, [(80, 96)] * 2), ref)
        assert torch.equal(ex({'0': feat}, props, [(80, 96)] * 2, ref_feats=[feat[:0, :, :, :]] * 2), ref)


def test_reference_order_does_not_change_the_aggregate():
    torch.manual_seed(4)
    feat, refs = torch.randn(1, 8, 10, 12, dtype=D), torch.randn(5, 8, 10, 12, dtype=D)
    props = [torch.tensor([[0., 0., 50., 40.], [8., 8., 90., 70.], [30., 5., 70., 33.]], dtype=D)]
    ex = TemporalRoIAlign(8, k=2, blocks=4).double()
    with torch.no_grad():
        a = ex({'0': feat}, props, [(80, 96)], ref_feats=[refs])
        for p in ([4, 2, 0, 3, 1], [1, 0, 2, 3, 4]):
            assert torch.allclose(ex({'0': feat}, props, [(80, 96)], ref_feats=[refs[p]]), a, atol=1e-12)


def test_chunking_is_exact():
    torch.manual_seed(5)
    feat, refs = torch.randn(1, 8, 10, 12, dtype=D), torch.randn(3, 8, 10, 12, dtype=D)
    props = [torch.rand(7, 2, dtype=D).mul(40).repeat(1, 2) + torch.tensor([0., 0., 30., 30.], dtype=D)]
    a, b = TemporalRoIAlign(8).double(), TemporalRoIAlign(8, chunk=2).double()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.allclose(a({'0': feat}, props, [(80, 96)], ref_feats=[refs]), b({'0': feat}, props, [(80, 96)], ref_feats=[refs]), atol=1e-12)


def test_zero_proposals_do_not_crash():
    ex = TemporalRoIAlign(8)
    feat, refs = torch.randn(2, 8, 10, 12), torch.randn(3, 8, 10, 12)
    out = ex({'0': feat}, [torch.zeros(0, 4), torch.tensor([[0., 0., 40., 40.]])], [(80, 96)] * 2, ref_feats=[refs, refs])
    assert out.shape == (1, 8, 7, 7)
    assert ex({'0': feat[:1]}, [torch.zeros(0, 4)], [(80, 96)], ref_feats=[refs]).shape == (0, 8, 7, 7)
    y = most_similar_roi_align(torch.zeros(0, 8, 7, 7), refs, 2)
    assert y.shape == (3, 0, 8, 7, 7)
    assert TemporalAttentionAggregation(8)(torch.zeros(0, 8, 7, 7), y).shape == (0, 8, 7, 7)


def test_tafa_bad_blocks():
    with pytest.raises(ValueError, match="blocks: expected 0 or a positive divisor of channels=10"):
        TemporalAttentionAggregation(10, 4)


# ---------------------------------------------------------------- sampling and memory
def test_bilateral_uniform_sampling():
    rng = random.Random(0)
    for L in (1, 2, 5, 30):
        for f in range(L):
            s = sample_ref_frames(f, L, 4, 9, rng=rng)
            left, right = [j for j in s if j < f], [j for j in s if j > f]
            assert len(left) == min(2, f, 9) and len(right) == min(2, L - 1 - f, 9) and len(set(s)) == len(s)
            assert all(abs(j - f) <= 9 for j in s) and s == sorted(s)
    assert sample_ref_frames(0, 1, 2, 0) == [0, 0]
    with pytest.raises(ValueError, match="frame_id: expected 0 <= frame_id < num_frames=3, got 3"):
        sample_ref_frames(3, 3)
    with pytest.raises(ValueError, match="method: expected"):
        sample_ref_frames(0, 3, method='uniform')


def test_adaptive_stride_and_cocovid_pairs():
    assert sample_ref_frames(3, 100, 14, method='adaptive_stride') == [round(i * 99 / 13) for i in range(14)]
    videos = {1: dict(frames=[10, 11, 12, 13]), 2: dict(frames=[20, 21])}
    pairs = cocovid_key_refs(videos, num_refs=2, frame_range=1, seed=0)
    assert [k for k, _ in pairs] == [10, 11, 12, 13, 20, 21]
    for k, rs in pairs:
        same = videos[1 if k < 20 else 2]['frames']
        assert all(r in same and r != k and abs(same.index(r) - same.index(k)) == 1 for r in rs)
    assert pairs == cocovid_key_refs(videos, num_refs=2, frame_range=1, seed=0)


def test_similarity_bytes_at_the_paper_shapes():
    assert troi_similarity_bytes(300, 14, 38, 63) == 300 * 49 * 14 * 38 * 63 * 4
    assert 1.8 < troi_similarity_bytes(300, 14) / 2**30 < 1.9 and 0.26 < troi_similarity_bytes(300, 2) / 2**30 < 0.27


# ---------------------------------------------------------------- SELSA
def official_selsa(p, x, ref, heads):
    "mmtracking's SelsaAggregator.forward, transcribed; p(name) -> (weight, bias) in the official layout."
    lin = lambda name, t: t @ p(name)[0].T + p(name)[1]
    roi_n, C = x.shape; ref_n = ref.shape[0]; c = C // heads
    e = lin('fc_embed', x).view(roi_n, heads, c).permute(1, 0, 2)
    re_ = lin('ref_fc_embed', ref).view(ref_n, heads, c).permute(1, 2, 0)
    w = (torch.bmm(e, re_) / c ** 0.5).softmax(dim=2)
    v = lin('ref_fc', ref).view(ref_n, heads, c).permute(1, 0, 2)
    return lin('fc', torch.bmm(w, v).permute(1, 0, 2).contiguous().view(roi_n, C))


def module_params(m):
    return lambda name: (getattr(m, name).weight, getattr(m, name).bias)


def loop_selsa(m, x, ref):
    "Per key proposal and head: softmax over reference proposals of scaled embedded dot products."
    H = m.heads; d = x.shape[1] // H
    out = []
    for i in range(len(x)):
        q, k, v = m.fc_embed(x[i]), m.ref_fc_embed(ref), m.ref_fc(ref)
        out.append(m.fc(torch.cat([torch.softmax(k[:, h * d:(h + 1) * d] @ q[h * d:(h + 1) * d] / math.sqrt(d), 0)
                                   @ v[:, h * d:(h + 1) * d] for h in range(H)])))
    return torch.stack(out)


def test_selsa_aggregator_matches_official_form_and_loop():
    torch.manual_seed(0)
    m = SelsaAggregator(24, heads=4).double()
    x, ref = torch.randn(5, 24, dtype=D), torch.randn(11, 24, dtype=D)
    with torch.no_grad():
        y = m(x, ref)
        assert torch.allclose(y, official_selsa(module_params(m), x, ref, 4), atol=1e-12)
        assert torch.allclose(y, loop_selsa(m, x, ref), atol=1e-12)
        for perm in (torch.randperm(11), torch.arange(10, -1, -1)):                  # reference order
            assert torch.allclose(m(x, ref[perm]), y, atol=1e-12)
        assert torch.equal(m(x, ref[:0]), m.fc.bias.expand(5, 24))                 # no references: fc(0)
        assert m(x[:0], ref).shape == (0, 24)
    assert torch.autograd.gradcheck(lambda a, b: m(a, b), (x[:2].requires_grad_(), ref[:3].requires_grad_()))
    with pytest.raises(ValueError, match="heads: expected a positive divisor of channels=24"):
        SelsaAggregator(24, heads=5)
    with pytest.raises(ValueError, match="ref: expected 24 channels like x"):
        m(x, ref[:, :12])


def test_selsa_head_matches_official_form_per_image():
    torch.manual_seed(1)
    hd = SelsaBoxHead(3 * 49, 16, num_fcs=3, heads=4).double()
    xa, xb = torch.randn(4, 3, 7, 7, dtype=D), torch.randn(2, 3, 7, 7, dtype=D)
    ra, rb = torch.randn(6, 3, 7, 7, dtype=D), torch.randn(5, 3, 7, 7, dtype=D)

    def official(x, ref):
        x, ref = x.flatten(1), ref.flatten(1)
        for fc, agg in zip(hd.shared_fcs, hd.aggregator):
            x, ref = fc(x), fc(ref)
            x = x + official_selsa(module_params(agg), x, ref, 4)
            ref, x = F.relu(ref), F.relu(x)
        return x
    with torch.no_grad():
        y = hd(torch.cat([xa, xb]), ref_x=[ra, rb], counts=[4, 2])
        assert torch.allclose(y, torch.cat([official(xa, ra), official(xb, rb)]), atol=1e-12)
        assert torch.allclose(hd(xa, ref_x=[ra[[3, 0, 5, 1, 4, 2]]]), y[:4], atol=1e-12)     # reference order
        assert torch.allclose(hd(xa), official(xa, xa), atol=1e-12)                          # no refs: own proposals
        assert hd(xa[:0], ref_x=[ra], counts=[0]).shape == (0, 16)                            # zero key proposals
    with pytest.raises(ValueError, match="ref_x: expected one"):
        hd(xa, ref_x=[ra, rb], counts=[4])


class _Single(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out_channels = torch.nn.Conv2d(3, 16, 3, stride=8, padding=1), 16

    def forward(self, x):
        return {'0': F.relu(self.conv(x))}


def test_selsa_detector_is_invariant_to_reference_order():
    from torchvision.models.detection.rpn import AnchorGenerator
    torch.manual_seed(2)
    det = TRoIFasterRCNN(_Single(), 4, selsa=True, representation=32, selsa_heads=4, min_size=64, max_size=64,
                         rpn_anchor_generator=AnchorGenerator(((8, 16, 32),), ((0.5, 1., 2.),)),
                         rpn_pre_nms_top_n_test=40, rpn_post_nms_top_n_test=15, box_score_thresh=0.0).double().eval()
    im, refs = [torch.rand(3, 64, 64, dtype=D)], torch.rand(3, 3, 64, 64, dtype=D)
    with torch.no_grad():
        a, b = det(im, refs=[refs])[0], det(im, refs=[refs[[2, 0, 1]]])[0]
    assert len(a['scores']) > 0
    assert torch.allclose(a['scores'], b['scores'], atol=1e-10) and torch.allclose(a['boxes'], b['boxes'], atol=1e-8)
    assert not det.roi_heads.box_roi_pool.ctx


# ---------------------------------------------------------------- official checkpoints
MANIFEST = Path(__file__).parent / "fixtures" / "temporal_roi_align_selsa_troi_r50_dc5_keys.json"


def test_manifest_converts_and_strict_loads_random_weights():
    "Random weights in the official layout (manifest shapes) -> convert -> strict load; values land where they should."
    man = json.loads(MANIFEST.read_text())
    assert "config" in man["written_from"] and man["source"].startswith("open-mmlab/mmtracking@")
    keys = man["keys"]
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) if s else torch.tensor(7)) for k, s in keys.items()}
    with torch.device('meta'):                                          # no init cost; strict load still checks keys and shapes
        model = troi_r50_dc5()
    model.load_state_dict(convert_mmtracking_troi(dict(state_dict=sd, meta={})), strict=True, assign=True)
    st = model.state_dict()
    p = 'detector.roi_head.bbox_head.'
    assert torch.equal(st['roi_heads.box_predictor.cls_score.weight'][0], sd[p + 'fc_cls.weight'][30])      # background
    assert torch.equal(st['roi_heads.box_predictor.cls_score.weight'][1:], sd[p + 'fc_cls.weight'][:30])
    assert torch.equal(st['roi_heads.box_predictor.bbox_pred.weight'][4:], sd[p + 'fc_reg.weight'])
    assert st['roi_heads.box_predictor.bbox_pred.bias'][:4].abs().max() == 0
    assert torch.equal(st['backbone.layer4.2.conv3.weight'], sd['detector.backbone.layer4.2.conv3.weight'])
    assert torch.equal(st['backbone.neck.weight'], sd['detector.neck.convs.0.conv.weight'])
    assert torch.equal(st['rpn.head.cls_logits.bias'], sd['detector.rpn_head.rpn_cls.bias'])
    assert torch.equal(st['roi_heads.box_roi_pool.aggregate.embed.weight'],
                       sd['detector.roi_head.bbox_roi_extractor.embed_network.conv.weight'])
    assert model.roi_heads.box_coder.weights == (5.0, 5.0, 5.0, 5.0)
    assert model.backbone.layer4[0].conv2.dilation == (2, 2) and model.backbone.layer4[0].conv2.stride == (1, 1)
    with pytest.raises(ValueError, match="state_dict: expected mmtracking SELSA/TRoI keys, got 1 unknown"):
        convert_mmtracking_troi({**sd, 'detector.roi_head.mask_head.conv.weight': torch.zeros(1)})


def test_converted_head_and_tafa_equal_the_official_computation():
    "Small official-layout tensors (float64): the converted SELSA head + predictor and TAFA vs the official formulas."
    g = torch.Generator().manual_seed(1)
    C, Dm, NH, NC, p = 4, 16, 2, 3, 'detector.roi_head.bbox_head.'
    sd = {p + f'shared_fcs.{i}.weight': torch.randn(Dm, C * 49 if i == 0 else Dm, generator=g, dtype=D) / 4 for i in range(3)}
    sd |= {p + f'shared_fcs.{i}.bias': torch.randn(Dm, generator=g, dtype=D) for i in range(3)}
    sd |= {p + f'aggregator.{i}.{m}.{s}': torch.randn(*((Dm, Dm) if s == 'weight' else (Dm,)), generator=g, dtype=D) / 4
           for i in range(3) for m in ('fc_embed', 'ref_fc_embed', 'fc', 'ref_fc') for s in ('weight', 'bias')}
    sd |= {p + 'fc_cls.weight': torch.randn(NC + 1, Dm, generator=g, dtype=D), p + 'fc_cls.bias': torch.randn(NC + 1, generator=g, dtype=D),
           p + 'fc_reg.weight': torch.randn(NC * 4, Dm, generator=g, dtype=D), p + 'fc_reg.bias': torch.randn(NC * 4, generator=g, dtype=D)}
    e = 'detector.roi_head.bbox_roi_extractor.embed_network.conv.'
    sd |= {e + 'weight': torch.randn(C, C, 3, 3, generator=g, dtype=D) / 4, e + 'bias': torch.randn(C, generator=g, dtype=D)}
    head = SelsaBoxHead(C * 49, Dm, 3, NH).double()
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    pred, tafa = FastRCNNPredictor(Dm, NC + 1).double(), TemporalAttentionAggregation(C, 4).double()
    conv = convert_mmtracking_troi(sd)
    for mod, pre in [(head, 'roi_heads.box_head.'), (pred, 'roi_heads.box_predictor.'), (tafa, 'roi_heads.box_roi_pool.aggregate.')]:
        mod.load_state_dict({k[len(pre):]: v for k, v in conv.items() if k.startswith(pre)}, strict=True)
    x, ref = torch.randn(5, C, 7, 7, generator=g, dtype=D), torch.randn(8, C, 7, 7, generator=g, dtype=D)
    prm = lambda i: (lambda name: (sd[p + f'aggregator.{i}.{name}.weight'], sd[p + f'aggregator.{i}.{name}.bias']))
    h, r = x.flatten(1), ref.flatten(1)
    for i in range(3):                                                   # SelsaBBoxHead.forward, official tensors
        W, b = sd[p + f'shared_fcs.{i}.weight'], sd[p + f'shared_fcs.{i}.bias']
        h, r = h @ W.T + b, r @ W.T + b
        h = h + official_selsa(prm(i), h, r, NH)
        r, h = F.relu(r), F.relu(h)
    ocls, oreg = h @ sd[p + 'fc_cls.weight'].T + sd[p + 'fc_cls.bias'], h @ sd[p + 'fc_reg.weight'].T + sd[p + 'fc_reg.bias']
    with torch.no_grad():
        cls, reg = pred(head(x, ref_x=[ref]))
        assert torch.allclose(cls[:, 1:], ocls[:, :NC], atol=1e-12) and torch.allclose(cls[:, 0], ocls[:, NC], atol=1e-12)
        assert torch.allclose(reg[:, 4:], oreg, atol=1e-12) and reg[:, :4].abs().max() == 0
        refs = torch.randn(2, 5, C, 7, 7, generator=g, dtype=D)
        emb = lambda z: F.conv2d(z, sd[e + 'weight'], sd[e + 'bias'], padding=1)
        assert torch.allclose(tafa(x, refs), official_tafa(emb, x[None], refs, 4), atol=1e-12)
