"Tests of xwlearn.detection.wssod (an implementation after the paper): label attention and random sampling against naive versions and their invariants, the E-step (random sampling as an unbiased Monte-Carlo E-step), the tag loss (float64, gradcheck), the agent detector's losses and errors."
import math
import pytest
from hypothesis import given, settings, strategies as st
import torch
from torch import nn
from xwlearn.detection.wssod import (label_attention, random_pseudo_sampling, wssod_pseudo_labels, weak_tag_loss, tags_from_labels,
                                     TagHead, AgentDetector)

torch.set_num_threads(1)

def _dets(g, n=4, m=7, K=4):
    return [dict(boxes=torch.rand(m, 4, generator=g).cumsum(1), scores=torch.rand(m, generator=g), labels=torch.randint(1, K, (m,), generator=g)) for _ in range(n)]

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_attention_matches_naive(seed):
    g = torch.Generator().manual_seed(seed)
    dets = _dets(g); tags = [set(torch.randint(1, 4, (2,), generator=g).tolist()) for _ in dets]
    for d, a, t in zip(dets, label_attention(dets, tags), tags):
        keep = [i for i, l in enumerate(d['labels'].tolist()) if l in t]
        assert a['labels'].tolist() == [d['labels'][i].item() for i in keep] and torch.equal(a['boxes'], d['boxes'][keep])
    soft = label_attention(dets, tags, soft=True)
    for d, s, t in zip(dets, soft, tags):
        assert torch.equal(s['scores'], torch.tensor([sc if l in t else 0.0 for sc, l in zip(d['scores'].tolist(), d['labels'].tolist())]))
    mh = torch.zeros(len(dets), 4, dtype=torch.bool)
    for i, t in enumerate(tags): mh[i, list(t)] = True
    assert [d['labels'].tolist() for d in label_attention(dets, mh)] == [d['labels'].tolist() for d in label_attention(dets, tags)]

def test_random_sampling_frequencies_and_e_step():
    d = [dict(boxes=torch.zeros(5, 4), scores=torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]), labels=torch.arange(5))]
    f = torch.zeros(5)
    for s in range(3000): f[random_pseudo_sampling(d, torch.Generator().manual_seed(s))[0]['labels']] += 1
    torch.testing.assert_close(f / 3000, d[0]['scores'], rtol=0, atol=0.03)
    f2 = torch.zeros(5)
    for s in range(3000): f2[random_pseudo_sampling(d, torch.Generator().manual_seed(s), tau=0.5)[0]['labels']] += 1
    torch.testing.assert_close(f2 / 3000, (d[0]['scores'] / 0.5).clamp(max=1), rtol=0, atol=0.03)
    g = torch.Generator().manual_seed(0); dets = _dets(g); tags = [{1}, {2}, {3}, {1, 2, 3}]
    hard = wssod_pseudo_labels(dets, tags, thr=0.4)
    for d0, h, t in zip(dets, hard, tags):
        m = (d0['scores'] >= 0.4) & torch.tensor([l in t for l in d0['labels'].tolist()])
        assert h['labels'].tolist() == d0['labels'][m].tolist()
    assert all(set(r['labels'].tolist()) <= t for r, t in zip(wssod_pseudo_labels(dets, tags, rps=True, g=g), tags))
    with pytest.raises(ValueError, match="tau: expected a positive number"): random_pseudo_sampling(d, tau=-1)
    with pytest.raises(ValueError, match="tags: expected one tag set"): label_attention(dets, tags[:1])

def test_weak_tag_loss_float64_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True); t = torch.rand(4, 6, generator=g) < 0.4
    p = torch.sigmoid(z[:, 1:]); y = t[:, 1:].double()
    torch.testing.assert_close(weak_tag_loss(z, t), -(y * p.log() + (1 - y) * (1 - p).log()).mean(), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: weak_tag_loss(z, t), (z,))
    torch.testing.assert_close(weak_tag_loss(z, t, ignore_background=False), -(t.double() * torch.sigmoid(z).log() + (1 - t.double()) * (1 - torch.sigmoid(z)).log()).mean())
    with pytest.raises(ValueError, match="logits, tags: expected the same shape"): weak_tag_loss(z, t[:2])
    assert tags_from_labels(torch.tensor([], dtype=torch.long), 3).tolist() == [False] * 3

def test_tag_head_max_pools_levels():
    h = TagHead(3, 2)
    f = [torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2, 2)]; f[1][0, 1, 1, 1] = 5.0; f[0][0, 0, 0, 0] = 2.0
    torch.testing.assert_close(h(f), h.fc(torch.tensor([[2.0, 5.0, 0.0]])))

class _Det(nn.Module):
    "A stand-in detector with torchvision's transform/backbone layout: loss = mean of the features."
    def __init__(self):
        super().__init__()
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
        self.transform = GeneralizedRCNNTransform(32, 32, [0.5] * 3, [0.25] * 3)
        self.backbone = nn.Conv2d(3, 8, 3, padding=1); self.backbone.out_channels = 8
    def forward(self, images, targets=None):
        il, _ = self.transform(images, targets); f = self.backbone(il.tensors)
        return dict(loss_det=f.mean()) if self.training else [dict(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long))] * len(images)

def test_agent_detector_full_and_weak():
    torch.manual_seed(0)
    a = AgentDetector(_Det(), 4, weight=2.0).train()
    ims = [torch.rand(3, 32, 32) for _ in range(3)]
    tg = [dict(boxes=torch.tensor([[1., 1., 9., 9.]]), labels=torch.tensor([2])), dict(tags=torch.tensor([0, 1, 0, 1], dtype=torch.bool)), dict(tags=torch.tensor([0, 0, 1, 0], dtype=torch.bool))]
    l = a(ims, tg)
    assert set(l) == {'loss_det', 'loss_tags'}
    with torch.no_grad():                                 # the tag loss in the agent's order: box images first, then tag-only ones
        z = torch.cat([a.tag_head([a.detector.backbone(a.detector.transform([im])[0].tensors)]) for im in ims])
        t = torch.stack([tags_from_labels(torch.tensor([2]), 4), tg[1]['tags'], tg[2]['tags']])
    torch.testing.assert_close(l['loss_tags'], 2.0 * weak_tag_loss(z, t), rtol=1e-5, atol=1e-6)
    only_weak = a(ims[1:], tg[1:]); assert 'loss_tags' in only_weak and 'loss_det' not in only_weak
    sum(only_weak.values()).backward(); assert a.detector.backbone.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="targets: expected one per image in training"): a(ims, tg[:2])
    a.eval(); assert a.image_scores(ims).shape == (3, 4) and isinstance(a(ims), list)

def test_rps_is_an_unbiased_monte_carlo_e_step():
    "The EM view: the M-step loss Σ_kept ℓ_i under random sampling averages to Σ min(1, s_i/τ) ℓ_i (the posterior-weighted loss); the hard E-step gives Σ_{s_i ≥ thr} ℓ_i."
    s = torch.tensor([0.02, 0.25, 0.45, 0.6, 0.95]); ell = torch.tensor([2.0, 1.0, 3.0, 0.5, 1.5])
    d = [dict(boxes=torch.zeros(5, 4), scores=s, labels=torch.arange(5))]          # label i = box i
    for tau in (1.0, 0.5):
        x = torch.stack([ell[random_pseudo_sampling(d, torch.Generator().manual_seed(k), tau=tau)[0]['labels']].sum() for k in range(3000)])
        want = ((s / tau).clamp(max=1) * ell).sum()
        assert abs(x.mean() - want) < 4 * x.std() / math.sqrt(len(x)), (tau, x.mean(), want)
    assert torch.equal(wssod_pseudo_labels(d, thr=0.5)[0]['labels'], torch.tensor([3, 4]))

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), thr=st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_label_attention_invariants(seed, n, thr):
    "Label attention keeps a subset of the boxes, is idempotent, is the identity when every class is tagged, and commutes with the threshold."
    g = torch.Generator().manual_seed(seed); K = 5
    dets = _dets(g, n=n, K=K); tags = [set(torch.randint(1, K, (int(torch.randint(0, 3, (1,), generator=g)),), generator=g).tolist()) for _ in dets]
    la = label_attention(dets, tags)
    for d, a, t in zip(dets, la, tags):
        assert len(a['boxes']) <= len(d['boxes']) and set(a['labels'].tolist()) <= t
    assert all(torch.equal(a['boxes'], b['boxes']) for a, b in zip(la, label_attention(la, tags)))
    assert all(torch.equal(a['boxes'], d['boxes']) for a, d in zip(label_attention(dets, [set(range(K))] * n), dets))
    thr_first = label_attention([{k: v[d['scores'] >= thr] for k, v in d.items()} for d in dets], tags)
    for a, b in zip(wssod_pseudo_labels(dets, tags, thr=thr), thr_first): assert torch.equal(a['labels'], b['labels']) and torch.equal(a['scores'], b['scores'])
