"""DETR pieces (`xwlearn.vision.detr`): deformable attention vs a per-point loop + gradcheck, matcher vs brute force,
refining decoder, denoising queries and the attention mask that stops leakage."""
import itertools, math
import pytest, torch
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou
from xwlearn.vision.detr import (ms_deform_attn, MSDeformAttn, match_cost, hungarian_match, inverse_sigmoid, sine_embed,
                                 DeformableDecoder, DeformableEncoderLayer, encoder_reference_points, dn_queries)

torch.set_num_threads(1)


def naive_msda(value, shapes, loc, w):
    "The definition: per (b, q, head, level, point), bilinear interpolation at (W·x − ½, H·y − ½), zero outside."
    B, S, M, D = value.shape; _, Q, _, L, K, _ = loc.shape
    starts = [0] + list(itertools.accumulate(h * w_ for h, w_ in shapes))
    out = torch.zeros(B, Q, M, D, dtype=value.dtype)
    for b, q, m, l, k in itertools.product(range(B), range(Q), range(M), range(L), range(K)):
        h, w_ = shapes[l]
        v = value[b, starts[l]:starts[l + 1], m].reshape(h, w_, D)
        x, y = loc[b, q, m, l, k, 0].item() * w_ - .5, loc[b, q, m, l, k, 1].item() * h - .5
        x0, y0 = math.floor(x), math.floor(y)
        for xi, yi in [(x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)]:
            if 0 <= xi < w_ and 0 <= yi < h: out[b, q, m] += w[b, q, m, l, k] * (1 - abs(x - xi)) * (1 - abs(y - yi)) * v[yi, xi]
    return out.reshape(B, Q, M * D)


def inputs(shapes, B=2, Q=3, M=2, D=3, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    return (torch.randn(B, S, M, D, dtype=torch.float64, generator=g),
            torch.rand(B, Q, M, L, K, 2, dtype=torch.float64, generator=g) * 1.4 - .2,
            torch.rand(B, Q, M, L, K, dtype=torch.float64, generator=g))


@pytest.mark.parametrize("shapes", [[(3, 5), (2, 2), (1, 3)], [(1, 1)], [(4, 3), (2, 1)]])
def test_msda_equals_loop(shapes):
    v, loc, w = inputs(shapes)
    assert torch.allclose(ms_deform_attn(v, torch.tensor(shapes), loc, w), naive_msda(v, shapes, loc, w), atol=1e-12)


def test_msda_gradcheck():
    shapes = [(3, 4), (2, 2)]
    args = tuple(t.requires_grad_() for t in inputs(shapes, B=1, Q=2, K=2, seed=1))
    assert torch.autograd.gradcheck(lambda v, p, a: ms_deform_attn(v, shapes, p, a), args)


def test_msda_errors():
    v, loc, w = inputs([(2, 2)])
    with pytest.raises(ValueError, match="value"): ms_deform_attn(v, [(2, 3)], loc, w)
    with pytest.raises(ValueError, match="spatial_shapes"): ms_deform_attn(v, [(2, 2), (1, 1)], loc, w)
    with pytest.raises(ValueError, match="attention_weights"): ms_deform_attn(v, [(2, 2)], loc, w[:, :1])


def test_module_uses_impl_and_boxes():
    torch.manual_seed(0)
    attn = MSDeformAttn(8, n_levels=2, n_heads=2, n_points=2).double()
    shp = torch.tensor([(3, 3), (2, 1)])
    q, mem = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 11, 8, dtype=torch.float64)
    seen = {}
    def spy(v, s, loc, a):
        seen["loc"], seen["a"] = loc, a
        return naive_msda(v, [tuple(x) for x in s.tolist()], loc, a)
    ref = torch.rand(2, 4, 2, 4, dtype=torch.float64) * .5 + .2
    out = attn(q, ref, mem, shp)
    attn.attn_impl = spy
    assert torch.allclose(attn(q, ref, mem, shp), out, atol=1e-10)
    # box references: offsets scaled by (w, h) / 2 / n_points around the centre; weights sum to one per head
    off = attn.sampling_offsets(q).view(2, 4, 2, 2, 2, 2)
    exp = ref[:, :, None, :, None, :2] + off / 2 * ref[:, :, None, :, None, 2:] * .5
    assert torch.allclose(seen["loc"], exp) and torch.allclose(seen["a"].sum((-1, -2)), torch.ones(2, 4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="d_model"): MSDeformAttn(10, n_heads=3)


@pytest.mark.parametrize("Q,Mt", [(4, 3), (3, 3), (2, 3), (5, 1)])
def test_matcher_is_brute_force_minimum(Q, Mt):
    g = torch.Generator().manual_seed(Q * 7 + Mt)
    box = lambda n: torch.cat([torch.rand(n, 2, generator=g), .1 + torch.rand(n, 2, generator=g) * .4], -1).double()
    logits, bx = torch.randn(1, Q, 3, dtype=torch.float64, generator=g), box(Q)[None]
    t = dict(labels=torch.randint(0, 3, (Mt,), generator=g), boxes=box(Mt))
    C = torch.zeros(Q, Mt, dtype=torch.float64)
    gi = generalized_box_iou(box_convert(bx[0], "cxcywh", "xyxy"), box_convert(t["boxes"], "cxcywh", "xyxy"))
    for i, j in itertools.product(range(Q), range(Mt)):
        p = torch.sigmoid(logits[0, i, t["labels"][j]]).item()
        C[i, j] = 2 * (.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - .75 * p ** 2 * -math.log(1 - p + 1e-8)) \
                  + 5 * (bx[0, i] - t["boxes"][j]).abs().sum() - 2 * gi[i, j]
    assert torch.allclose(match_cost(logits[0], bx[0], t["labels"], t["boxes"]), C)
    (pi, ti), = hungarian_match(logits, bx, [t])
    n = min(Q, Mt)
    best = min(sum(C[p[j], j] if Q >= Mt else C[j, p[j]] for j in range(n)) for p in itertools.permutations(range(max(Q, Mt)), n))
    assert abs(C[pi, ti].sum().item() - float(best)) < 1e-9
    (pi, ti), = hungarian_match(logits, bx, [t], k=2)
    assert len(pi) == min(Q, 2 * Mt) and torch.bincount(ti, minlength=Mt).max() <= 2
    with pytest.raises(ValueError, match="targets"): hungarian_match(logits, bx, [t, t])


def test_decoder_refinement():
    torch.manual_seed(0)
    dec = DeformableDecoder(16, n_heads=2, n_levels=2, n_points=2, d_ffn=32, n_layers=3)
    mem, shp = torch.randn(1, 5, 16), torch.tensor([(2, 2), (1, 1)])
    tgt, r0 = torch.randn(1, 4, 16), torch.tensor([[[.5, .5, .2, .3]]]).repeat(1, 4, 1)
    c = torch.tensor([.2, .1, -.3, .05])
    with torch.no_grad():
        for h in dec.box_heads: h[-1].bias.copy_(c)
    hs, bx = dec(tgt, r0, mem, shp)
    assert hs.shape == (3, 1, 4, 16)
    for l in range(3): assert torch.allclose(bx[l], torch.sigmoid(inverse_sigmoid(r0) + (l + 1) * c), atol=1e-6)
    with torch.no_grad():
        for h in dec.box_heads: h[-1].weight.normal_(0, .1)
    hs, bx = dec(tgt, r0, mem, shp, valid_ratios=torch.ones(1, 2, 2))
    grads = torch.autograd.grad(bx[2].sum(), [*dec.box_heads[0].parameters(), *dec.box_heads[1].parameters()], allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)  # later layers do not train earlier box heads
    assert sine_embed(torch.rand(2, 4), 8).shape == (2, 32)
    with pytest.raises(ValueError, match="reference"): dec(tgt, r0[..., :2], mem, shp)


def test_dn_mask_stops_leakage():
    g = torch.Generator().manual_seed(0)
    tg = [dict(labels=torch.tensor([0, 1]), boxes=torch.tensor([[.4, .4, .2, .2], [.6, .6, .2, .3]])),
          dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4))]
    dn = dn_queries(tg, num_classes=2, n_queries=3, n_groups=3, generator=g)
    N, gs = dn["labels"].shape[1], dn["group_size"]
    assert (N, gs) == (12, 4) and not dn["valid"][1].any() and (dn["labels"][1] == 2).all()
    mask = dn["attn_mask"]
    # brute force over (i, j): may i see j?
    for i, j in itertools.product(range(N + 3), repeat=2):
        allowed = (j >= N) or (i < N and i // gs == j // gs)
        assert mask[i, j].item() == (not allowed), (i, j)
    torch.manual_seed(0)
    sa = nn.MultiheadAttention(4, 1, batch_first=True)
    x = torch.randn(1, N + 3, 4)
    f = lambda x: sa(x, x, x, attn_mask=mask, need_weights=False)[0]
    y = f(x)
    for grp in range(3):
        x2 = x.clone(); x2[:, grp * gs:(grp + 1) * gs] += 5
        y2 = f(x2)
        others = [i for i in range(N + 3) if not grp * gs <= i < (grp + 1) * gs]
        assert torch.allclose(y2[:, others], y[:, others], atol=1e-6)
    nd = dn_queries(tg, num_classes=2, n_queries=3, n_groups=3, contrastive=False, generator=g)
    assert nd["group_size"] == 2 and nd["positive"].sum() == nd["valid"].sum() == 6


def test_encoder_reference_points_and_padding():
    shapes = [(3, 2), (1, 1)]
    vr = torch.tensor([[[1., .5], [1., 1.]], [[1., 1.], [1., 1.]]])
    ref = encoder_reference_points(shapes, vr)
    assert ref.shape == (2, 7, 2, 2)
    for b, l in itertools.product(range(2), range(2)):
        i = 0
        for h, w in shapes:
            for y, x in itertools.product(range(h), range(w)):
                base = torch.tensor([(x + .5) / (w * vr[b, 0 if i < 6 else 1, 0]), (y + .5) / (h * vr[b, 0 if i < 6 else 1, 1])])
                assert torch.allclose(ref[b, i, l], base * vr[b, l]); i += 1
    torch.manual_seed(0)
    enc = DeformableEncoderLayer(8, n_heads=2, n_levels=2, n_points=3, d_ffn=16)
    src, pos, pad = torch.randn(2, 7, 8), torch.randn(2, 7, 8), torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 4:6] = True
    y = enc(src, pos, ref, torch.tensor(shapes), pad)
    src2 = src.clone(); src2[0, 4:6] = 50.
    keep = [0, 1, 2, 3, 6]
    assert torch.allclose(enc(src2, pos, ref, torch.tensor(shapes), pad)[0, keep], y[0, keep], atol=1e-5)
