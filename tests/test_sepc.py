"""SEPC (`xwlearn.detection.sepc`) against independent references.

The references are written from the paper's equations (a 3-D convolution over scale; BN statistics over all levels)
and from the official `forward` of jshilong/SEPC (`sepc/self_mmdet/models/necks/sepc.py`, `ops/dcn/sepc_dconv.py` at
4d8557d), transcribed onto the official state-dict keys; the key manifest `fixtures/sepc_neck_keys.json` was dumped
once from the unmodified official module (mmdet imports stubbed) — it shares no code with the converter under test.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from xwlearn.detection.sepc import (SEConv2d, PConv, IntegratedBN, SEPC, SEPC_VARIANTS, SEPCHead, add_sepc,
                                    convert_official_sepc, load_official_sepc, check_pyramid)

torch.set_num_threads(1)
MANIFEST = json.loads((Path(__file__).parent / 'fixtures' / 'sepc_neck_keys.json').read_text())
D = torch.float64


# ---------------------------------------------------------------- references
def official_forward(sd, feats, head_padding=0, train=False, p='neck.1.'):
    "jshilong/SEPC SEPC.forward on the official keys: sepc_conv deforms at output level >= 1; upsample_bilinear = align_corners."
    def conv(name, x, level, stride=1, pad=1):
        w, b = sd[f'{p}{name}.weight'], sd[f'{p}{name}.bias']
        if level >= 1 and f'{p}{name}.conv_offset.weight' in sd:
            off = F.conv2d(x, sd[f'{p}{name}.conv_offset.weight'], sd[f'{p}{name}.conv_offset.bias'], stride, pad)
            return deform_conv2d(x, off, w, None, stride=stride, padding=pad) + b[None, :, None, None]
        return F.conv2d(x, w, b, stride, pad)

    def ibn(name, fs):
        if f'{p}{name}.weight' not in sd: return fs
        if train:
            cat = torch.cat([f.transpose(0, 1).reshape(f.shape[1], -1) for f in fs], 1)
            m, v = cat.mean(1), cat.var(1, unbiased=False)
        else: m, v = sd[f'{p}{name}.running_mean'], sd[f'{p}{name}.running_var']
        g, b = sd[f'{p}{name}.weight'], sd[f'{p}{name}.bias']
        return [(f - m[:, None, None]) / (v[:, None, None] + 1e-5).sqrt() * g[:, None, None] + b[:, None, None] for f in fs]

    n = 1 + max(int(k[len(p):].split('.')[1]) for k in sd if k.startswith(p + 'Pconvs.'))
    x = feats
    for i in range(n):
        nx = []
        for l, f in enumerate(x):
            t = conv(f'Pconvs.{i}.Pconv.1', f, l)
            if l > 0: t = t + conv(f'Pconvs.{i}.Pconv.2', x[l - 1], l, stride=2)
            if l < len(x) - 1:
                t = t + F.interpolate(conv(f'Pconvs.{i}.Pconv.0', x[l + 1], l), size=t.shape[-2:], mode='bilinear', align_corners=True)
            nx.append(t)
        x = [F.relu(t) for t in ibn(f'Pconvs.{i}.bn', nx)]
    cls = ibn('cbn', [conv('cconv', f, l, pad=head_padding) for l, f in enumerate(x)])
    loc = ibn('lbn', [conv('lconv', f, l, pad=head_padding) for l, f in enumerate(x)])
    return [F.relu(t) for t in cls], [F.relu(t) for t in loc]


def random_official(keys, seed, channels=None):
    g = torch.Generator().manual_seed(seed); out = {}
    for k, s in keys.items():
        s = [channels if (channels and d == 256) else d for d in s]
        if k.endswith('num_batches_tracked'): out[k] = torch.tensor(0); continue
        t = torch.randn(s, generator=g, dtype=D)
        if k.endswith('running_var'): t = t.abs() + 0.5
        elif 'conv_offset' in k: t = t * 0.05          # non-zero offsets: the deformable path is exercised
        elif k.endswith('weight') and len(s) == 4: t = t / (s[1] * 9) ** 0.5
        out[k] = t
    return out


def close(a, b, tol=1e-9):
    a, b = (a[0] + a[1], b[0] + b[1])
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert (x - y).abs().max().item() <= tol * (1 + y.abs().max().item())


# ---------------------------------------------------------------- official checkpoints
@pytest.mark.parametrize('name', list(MANIFEST['configs']))
def test_manifest_converts_one_to_one_and_loads_strictly(name):
    keys = MANIFEST['configs'][name]['keys']
    sd = {k: torch.zeros(s) for k, s in keys.items()}
    conv = convert_official_sepc({'meta': {}, 'state_dict': {**sd, 'bbox_head.retina_cls.weight': torch.zeros(1)}})
    assert len(conv) == len(keys)
    assert sorted(id(t) for t in conv.values()) == sorted(id(t) for t in sd.values())    # every tensor, unchanged, once
    net = load_official_sepc(sd)
    flags = dict(ibn=net.norms is not None, pconv_deform=net.pconvs[0].fine.offset is not None,
                 head_deform=net.loc_conv.offset is not None)
    assert flags == SEPC_VARIANTS[name]
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in conv.items()}
    official_kw = MANIFEST['configs'][name]['kwargs']
    assert flags == dict(ibn=official_kw['iBN'], pconv_deform=official_kw['pconv_deform'], head_deform=official_kw['lcconv_deform'])


@pytest.mark.parametrize('name', list(MANIFEST['configs']))
def test_official_outputs_small_channels(name):
    "Training and eval mode, official unpadded cls/loc convs, 8 channels (the official module hard-codes 256)."
    sd = random_official(MANIFEST['configs'][name]['keys'], seed=3, channels=8)
    feats = [torch.randn(4, 8, s, s, dtype=D) for s in (48, 24, 12, 6, 3)]
    net = load_official_sepc(sd, head_padding=0)
    assert next(net.parameters()).dtype == D
    with torch.no_grad():
        close(net.eval()(feats), official_forward(sd, feats, head_padding=0, train=False))    # running statistics
        close(net.train()(feats), official_forward(sd, feats, head_padding=0, train=True))    # batch statistics over all levels


def test_official_outputs_full_width():
    "The real 256-channel shapes, on tiny levels, with our padded cls/loc convs."
    sd = random_official(MANIFEST['configs']['sepc']['keys'], seed=0)
    feats = [torch.randn(1, 256, s, s, dtype=D) for s in (4, 2, 1, 1, 1)]
    net = load_official_sepc(sd).eval()
    with torch.no_grad(): close(net(feats), official_forward(sd, feats, head_padding=1))


def test_converter_errors():
    with pytest.raises(KeyError, match='unexpected key'): convert_official_sepc({'neck.1.Pconvs.0.extra.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match='no key starts with prefix'): convert_official_sepc({'neck.0.x': torch.zeros(1)})
    with pytest.raises(TypeError, match='state_dict must be a dict'): convert_official_sepc([1, 2])


# ---------------------------------------------------------------- the mechanism
def test_pconv_is_conv3d_on_equal_size_levels():
    torch.manual_seed(0)
    c3 = nn.Conv3d(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, 4, 7, 6, dtype=D)
    pc = PConv(3, 5).double()
    with torch.no_grad():
        for k, m in enumerate((pc.fine, pc.same, pc.coarse)): m.weight.copy_(c3.weight[:, :, k]); m.bias.zero_()
        pc.same.bias.copy_(c3.bias)
    y = torch.stack(pc(list(x.unbind(2))), 2)
    assert torch.allclose(y, c3(x), atol=1e-12)


def test_pconv_on_a_pyramid_matches_the_equation():
    torch.manual_seed(1)
    pc = PConv(3, 4).double()
    with torch.no_grad():
        for p in pc.parameters(): p.normal_()
    pyr = [torch.randn(2, 3, h, w, dtype=D) for h, w in ((12, 13), (6, 7), (3, 4), (2, 2), (1, 1))]
    out = pc(pyr)
    for l, x in enumerate(pyr):   # y_l = (w_f ∗ x_{l-1})[::2, ::2] + w_s ∗ x_l + up(w_c ∗ x_{l+1}) + biases present
        y = F.conv2d(x, pc.same.weight, pc.same.bias, padding=1)
        if l > 0: y = y + F.conv2d(pyr[l - 1], pc.fine.weight, pc.fine.bias, padding=1)[..., ::2, ::2]
        if l < len(pyr) - 1:
            c = F.conv2d(pyr[l + 1], pc.coarse.weight, pc.coarse.bias, padding=1)
            y = y + F.interpolate(c, size=x.shape[-2:], mode='bilinear', align_corners=True)
        assert torch.allclose(out[l], y, atol=1e-12)


def test_pconv_gradcheck():
    torch.manual_seed(2)
    pc = PConv(2, 2, deform=True).double()
    with torch.no_grad(): pc.fine.offset.bias.uniform_(0.1, 0.4); pc.same.offset.bias.uniform_(0.1, 0.4)
    pyr = [torch.randn(1, 2, s, s, dtype=D, requires_grad=True) for s in (4, 2, 1)]
    assert torch.autograd.gradcheck(lambda *p: torch.cat([t.flatten() for t in pc(list(p))]), pyr)


def test_zero_offsets_equal_plain_kernels():
    torch.manual_seed(3)
    x = [torch.randn(4, 8, s, s, dtype=D) for s in (8, 4, 2, 1, 1)]
    for name in ('sepc_lite', 'sepc'):
        plain, deform = SEPC.variant('ibn', 8).double(), SEPC.variant(name, 8).double()
        missing, unexpected = deform.load_state_dict(plain.state_dict(), strict=False)
        assert not unexpected and missing and all('.offset.' in k for k in missing)
        close(deform(x), plain(x), 1e-12)
        with torch.no_grad(): deform.loc_conv.offset.bias.fill_(0.3)
        plain.eval(); deform.eval()   # running statistics: in training iBN would carry level 1's change to level 0
        assert torch.allclose(deform(x)[1][0], plain(x)[1][0], atol=1e-12)     # level 0 keeps the plain kernel
        assert not torch.allclose(deform(x)[1][1], plain(x)[1][1], atol=1e-6)  # levels >= 1 deform


def test_integrated_bn_statistics():
    torch.manual_seed(4)
    feats = [torch.randn(3, 5, s, s, dtype=D) * (l + 1) + l for l, s in enumerate((6, 3, 2))]
    ibn = IntegratedBN(5).double()
    out = ibn(feats)
    vals = torch.cat([f.permute(1, 0, 2, 3).reshape(5, -1) for f in feats], 1)
    mu, var = vals.mean(1), vals.var(1, unbiased=False)
    for f, o in zip(feats, out):
        assert torch.allclose(o, (f - mu[:, None, None]) / (var[:, None, None] + 1e-5).sqrt(), atol=1e-10)
    assert torch.allclose(ibn.bn.running_var, 0.9 + 0.1 * vals.var(1, unbiased=True), atol=1e-12)
    assert torch.autograd.gradcheck(lambda *f: torch.cat([t.flatten() for t in IntegratedBN(5).double()(list(f))]),
                                    [f[:2, :, :3, :3].clone().requires_grad_() for f in feats])


def test_gaussian_pyramid_equivariance_with_the_module():
    "The paper's motivation: PConvs commute with a 2x rescale on a Gaussian pyramid, above the levels the missing finest one reaches."
    torch.manual_seed(5)
    k1 = torch.tensor([1., 4., 6., 4., 1.], dtype=D) / 16; k = (k1[:, None] * k1[None]).view(1, 1, 5, 5)
    def gauss(img, n):
        out = [img]
        for _ in range(n - 1): out.append(F.conv2d(F.pad(out[-1], (2,) * 4, mode='replicate'), k)[..., ::2, ::2])
        return out
    img = F.avg_pool2d(torch.rand(1, 1, 136, 136, dtype=D), 9, 1)
    A, B = gauss(img, 8), gauss(gauss(img, 2)[1], 7)
    stack = [PConv(1, 4, std=0.3).double()] + [PConv(4, 4, std=0.3).double() for _ in range(2)]
    def run(p):
        for pc in stack: p = [F.relu(t) for t in pc(p)]
        return p
    with torch.no_grad(): oa, ob = run(A), run(B)
    err = [((b - oa[l + 1]).norm() / oa[l + 1].norm()).item() for l, b in enumerate(ob)]
    assert max(err[3:]) < 1e-12 and min(err[:3]) > 1e-4, err


def test_torchvision_retinanet_and_fcos():
    from torchvision.models.detection import RetinaNet, FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    class Backbone(nn.Module):
        out_channels = 32   # FCOS's towers use GroupNorm(32)
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList(nn.Conv2d(c, 32, 3, 2, 1) for c in (3, 32, 32, 32, 32))
            self.fpn = FeaturePyramidNetwork([32] * 3, 32, extra_blocks=LastLevelP6P7(32, 32))
        def forward(self, x):
            fs = {}
            for i, s in enumerate(self.stages):
                x = F.relu(s(x))
                if i >= 2: fs[str(i)] = x
            return self.fpn(fs)

    torch.manual_seed(6)
    ims = [torch.rand(3, 64, 64) for _ in range(2)]
    tgts = [dict(boxes=torch.tensor([[4., 6., 30., 40.]]), labels=torch.tensor([1])),
            dict(boxes=torch.tensor([[10., 10., 60., 50.]]), labels=torch.tensor([2]))]
    anchors = AnchorGenerator(tuple((s,) for s in (32, 64, 128, 256, 512)), ((1.0,),) * 5)
    for det, variant in ((RetinaNet(Backbone(), 3, anchor_generator=anchors, min_size=64, max_size=64), 'sepc'),
                         (FCOS(Backbone(), 3, min_size=64, max_size=64), 'pconv')):
        add_sepc(det, variant)
        assert isinstance(det.head, SEPCHead) and isinstance(det.head.head.regression_head.conv, nn.Identity)
        losses = det(ims, tgts)
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
        assert det.head.sepc.pconvs[-1].coarse.weight.grad.abs().sum() > 0
        det.eval()
        with torch.no_grad(): assert len(det(ims)) == 2
        with pytest.raises(ValueError, match='already has a SEPC head'): add_sepc(det)


def test_clear_errors():
    x = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)]
    with pytest.raises(TypeError, match='non-empty list'): check_pyramid(x[0])
    with pytest.raises(TypeError, match='non-empty list'): PConv(4, 4)([])
    with pytest.raises(ValueError, match=r'must be 4-D'): PConv(4, 4)([torch.randn(4, 8, 8)])
    with pytest.raises(ValueError, match=r'does not map onto feats\[1\]'): PConv(4, 4)([x[0], torch.randn(2, 4, 3, 3)])
    with pytest.raises(ValueError, match='built for channels=8'): SEPC(8)(x)
    with pytest.raises(ValueError, match='variant must be one of'): SEPC.variant('full')
    with pytest.raises(TypeError, match='head must be a torchvision'): SEPCHead(SEPC(4), nn.Linear(1, 1))
