"""DINO in the substrate (`xwlearn.vision.dino_detr`): the mmdet 3 key manifest converts and loads strictly; a tiny model with
random official-layout weights equals a float64 transcription of mmdet's DINO forward (test and training, with the same
denoising queries); a tiny DINO learns; bad inputs raise clear errors."""
import json, math
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xwlearn.vision.dino_detr import (DINO, convert_official_dino, dino_r50, dino_decode, select_queries, dn_groups, set_loss)

torch.set_num_threads(1)
FIX = Path(__file__).parent/'fixtures'


def official_dino_layout(in_channels=(512, 1024, 2048), n_levels=4, d=256, heads=8, points=4, ffn=2048, n_enc=6, n_dec=6, K=80, Q=900):
    """Non-backbone keys -> shapes of mmdet 3's DINO (configs/dino/dino-4scale_r50_8xb2-12e_coco.py), from the code: ChannelMapper
    (ConvModule conv + gn), DeformableDetrTransformerEncoder/DecoderLayer (mmcv MSDA, MultiheadAttention `.attn`, FFN `layers.0.0`/
    `layers.1`, `norms.i`), DinoTransformerDecoder (`ref_point_head` MLP `layers.0/1`, `norm`), DINO (`query_embedding`,
    `level_embed`, `memory_trans_fc/norm`), CdnQueryGenerator (`label_embedding`), DINOHead (n_dec + 1 cls / 3-layer reg branches)."""
    k = {}
    def lin(p, o, i): k[p + '.weight'] = [o, i]; k[p + '.bias'] = [o]
    def ln(p): k[p + '.weight'] = [d]; k[p + '.bias'] = [d]
    def msda(p):
        lin(p + '.sampling_offsets', heads * n_levels * points * 2, d); lin(p + '.attention_weights', heads * n_levels * points, d)
        lin(p + '.value_proj', d, d); lin(p + '.output_proj', d, d)
    for i, c in enumerate(in_channels):
        k[f'neck.convs.{i}.conv.weight'] = [d, c, 1, 1]; k[f'neck.convs.{i}.gn.weight'] = [d]; k[f'neck.convs.{i}.gn.bias'] = [d]
    for j in range(n_levels - len(in_channels)):
        k[f'neck.extra_convs.{j}.conv.weight'] = [d, in_channels[-1] if j == 0 else d, 3, 3]
        k[f'neck.extra_convs.{j}.gn.weight'] = [d]; k[f'neck.extra_convs.{j}.gn.bias'] = [d]
    for i in range(n_enc):
        p = f'encoder.layers.{i}'
        msda(p + '.self_attn'); lin(p + '.ffn.layers.0.0', ffn, d); lin(p + '.ffn.layers.1', d, ffn); ln(p + '.norms.0'); ln(p + '.norms.1')
    for i in range(n_dec):
        p = f'decoder.layers.{i}'
        k[p + '.self_attn.attn.in_proj_weight'] = [3 * d, d]; k[p + '.self_attn.attn.in_proj_bias'] = [3 * d]; lin(p + '.self_attn.attn.out_proj', d, d)
        msda(p + '.cross_attn'); lin(p + '.ffn.layers.0.0', ffn, d); lin(p + '.ffn.layers.1', d, ffn)
        for n in range(3): ln(p + f'.norms.{n}')
    lin('decoder.ref_point_head.layers.0', d, 2 * d); lin('decoder.ref_point_head.layers.1', d, d); ln('decoder.norm')
    k['query_embedding.weight'] = [Q, d]; k['level_embed'] = [n_levels, d]; lin('memory_trans_fc', d, d); ln('memory_trans_norm')
    k['dn_query_generator.label_embedding.weight'] = [K, d]
    for i in range(n_dec + 1):
        lin(f'bbox_head.cls_branches.{i}', K, d)
        lin(f'bbox_head.reg_branches.{i}.0', d, d); lin(f'bbox_head.reg_branches.{i}.2', d, d); lin(f'bbox_head.reg_branches.{i}.4', 4, d)
    return k


def test_official_manifest_converts_and_loads_strictly():
    "The committed manifest (written from the official code) = the layout above at R50 size + mmdet's ResNet-50; every key converts to a slot of its shape, strictly, with no key left over."
    man = json.loads((FIX/'dino_r50_4scale_keys.json').read_text())['keys']
    assert {k: v for k, v in man.items() if not k.startswith('backbone.')} == official_dino_layout()
    fcn = json.loads((FIX/'ddq_fcn_r50_keys.json').read_text())['keys']          # a dumped mmdet ResNet-50
    assert {k: v for k, v in man.items() if k.startswith('backbone.')} == {k: v for k, v in fcn.items() if k.startswith('backbone.')}
    sd = {k: torch.full(s, float(i)) for i, (k, s) in enumerate(man.items())}        # a distinct value per tensor: swaps show
    conv = convert_official_dino({'meta': {}, 'state_dict': sd})
    assert len(conv) == len(man)
    with torch.device('meta'): m = dino_r50(80)
    m.load_state_dict(conv, strict=True, assign=True)
    own = m.state_dict()
    assert set(conv) - set(own) == {k for k in conv if k.endswith('num_batches_tracked')}   # frozen BN (official) keeps no counter
    for k, v in own.items(): assert conv[k] is v or torch.equal(conv[k], v), k
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.startswith(('backbone.m.conv1', 'backbone.m.layer1')))   # frozen_stages=1
    semi = {p + k: v for p in ('teacher.', 'student.') for k, v in sd.items()}       # MixPL: two copies of the detector
    assert convert_official_dino(semi, prefix='teacher.').keys() == conv.keys()
    with pytest.raises(KeyError, match='unexpected key'): convert_official_dino({'bbox_head.foo.weight': torch.zeros(1)})
    with pytest.raises(TypeError, match='state_dict must be a dict'): convert_official_dino([1])


# ---------------------------------------------------------------- mmdet's DINO forward, transcribed (float64)

from mmdet_detr_ref import lin as _lin, ln as _ln, sine as _sine, msda as _msda, mha as _mha   # the official arithmetic, shared with test_ddq.py

def _official(sd, feats, img_hw, batch_hw, cfg, dn=None):
    """mmdet 3 DINO: DeformableDETR.pre_transformer / forward_encoder / gen_encoder_output_proposals, DINO.pre_decoder /
    forward_decoder, DinoTransformerDecoder.forward, DeformableDETRHead.forward. `dn` = (label_query, bbox_query_unact, attn_mask)
    as CdnQueryGenerator returns them (training); None = test."""
    d, heads, L, P, n_dec, Q, groups = (cfg[k] for k in ('d', 'heads', 'L', 'P', 'n_dec', 'Q', 'groups'))
    gn = lambda x, p: F.group_norm(x, groups, sd[p + '.weight'], sd[p + '.bias'])
    outs = [gn(F.conv2d(f, sd[f'neck.convs.{i}.conv.weight']), f'neck.convs.{i}.gn') for i, f in enumerate(feats)]
    outs.append(gn(F.conv2d(feats[-1], sd['neck.extra_convs.0.conv.weight'], stride=2, padding=1), 'neck.extra_convs.0.gn'))
    B = len(img_hw)
    masks = torch.ones(B, *batch_hw, dtype=torch.float64)
    for i, (h, w) in enumerate(img_hw): masks[i, :h, :w] = 0
    mlvl = [F.interpolate(masks[None], size=o.shape[-2:]).to(torch.bool).squeeze(0) for o in outs]
    src, pos, kpm, shapes, vr = [], [], [], [], []
    for l, (o, m) in enumerate(zip(outs, mlvl)):                       # SinePositionalEncoding(128, normalize, offset 0, temperature 20)
        nm = (~m).to(torch.float64)
        y, x = nm.cumsum(1), nm.cumsum(2)
        y, x = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi, x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
        pe = torch.cat([_sine(y, d // 2, 20), _sine(x, d // 2, 20)], -1)
        src.append(o.flatten(2).transpose(1, 2)); pos.append(pe.flatten(1, 2) + sd['level_embed'][l]); kpm.append(m.flatten(1))
        shapes.append(o.shape[-2:])
        vr.append(torch.stack([(~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]], -1).to(torch.float64))
    src, pos, kpm, shapes, vr = torch.cat(src, 1), torch.cat(pos, 1), torch.cat(kpm, 1), torch.tensor(shapes), torch.stack(vr, 1)
    refs = []                                                          # get_encoder_reference_points
    for l, (H, W) in enumerate(shapes.tolist()):
        ry, rx = torch.meshgrid(torch.linspace(0.5, H - 0.5, H, dtype=torch.float64), torch.linspace(0.5, W - 0.5, W, dtype=torch.float64), indexing='ij')
        refs.append(torch.stack((rx.reshape(-1)[None] / (vr[:, None, l, 0] * W), ry.reshape(-1)[None] / (vr[:, None, l, 1] * H)), -1))
    eref = torch.cat(refs, 1)[:, :, None] * vr[:, None]
    q = src
    for i in range(cfg['n_enc']):
        p = f'encoder.layers.{i}'
        q = _ln(sd, p + '.norms.0', q + _msda(sd, p + '.self_attn', q + pos, q, eref, shapes, kpm, heads, L, P))
        q = _ln(sd, p + '.norms.1', q + _lin(sd, p + '.ffn.layers.1', F.relu(_lin(sd, p + '.ffn.layers.0.0', q))))
    memory, props, start = q, [], 0                                    # gen_encoder_output_proposals
    for l, (H, W) in enumerate(shapes.tolist()):
        mf = kpm[:, start:start + H * W].view(B, H, W, 1)
        vH, vW = (~mf[:, :, 0, 0]).sum(1)[:, None], (~mf[:, 0, :, 0]).sum(1)[:, None]
        gy, gx = torch.meshgrid(torch.linspace(0, H - 1, H, dtype=torch.float64), torch.linspace(0, W - 1, W, dtype=torch.float64), indexing='ij')
        grid = (torch.cat([gx[..., None], gy[..., None]], -1)[None].expand(B, -1, -1, -1) + 0.5) / torch.cat([vW, vH], 1).view(B, 1, 1, 2)
        props.append(torch.cat((grid, torch.ones_like(grid) * 0.05 * 2.0 ** l), -1).view(B, -1, 4)); start += H * W
    op = torch.cat(props, 1)
    okp = ((op > 0.01) & (op < 0.99)).sum(-1, keepdim=True) == 4
    op = torch.log(op / (1 - op)).masked_fill(kpm[..., None], float('inf')).masked_fill(~okp, float('inf'))
    om = memory.masked_fill(kpm[..., None], 0.).masked_fill(~okp, 0.)
    om = _ln(sd, 'memory_trans_norm', _lin(sd, 'memory_trans_fc', om))
    cls_b = lambda i, x: _lin(sd, f'bbox_head.cls_branches.{i}', x)
    reg_b = lambda i, x: _lin(sd, f'bbox_head.reg_branches.{i}.4', F.relu(_lin(sd, f'bbox_head.reg_branches.{i}.2', F.relu(_lin(sd, f'bbox_head.reg_branches.{i}.0', x)))))
    e_cls, e_un = cls_b(n_dec, om), reg_b(n_dec, om) + op              # DINO.pre_decoder
    topk = torch.topk(e_cls.max(-1)[0], k=Q, dim=1)[1]
    topk_score = torch.gather(e_cls, 1, topk[..., None].repeat(1, 1, e_cls.shape[-1]))
    topk_unact = torch.gather(e_un, 1, topk[..., None].repeat(1, 1, 4))
    query = sd['query_embedding.weight'][:, None, :].repeat(1, B, 1).transpose(0, 1)
    ref, mask = topk_unact, None
    if dn is not None:
        query, ref, mask = torch.cat([dn[0], query], 1), torch.cat([dn[1], topk_unact], 1), dn[2]
    ref = ref.sigmoid()
    inter, inter_refs = [], [ref]
    for lid in range(n_dec):                                           # DinoTransformerDecoder.forward
        rin = ref[:, :, None] * torch.cat([vr, vr], -1)[:, None]
        emb = rin[:, :, 0] * 2 * math.pi
        sine = torch.cat([_sine(emb[..., i], d // 2, 10000) for i in (1, 0, 2, 3)], -1)      # coordinate_to_encoding
        qpos = _lin(sd, 'decoder.ref_point_head.layers.1', F.relu(_lin(sd, 'decoder.ref_point_head.layers.0', sine)))
        p = f'decoder.layers.{lid}'
        query = _ln(sd, p + '.norms.0', query + _mha(sd, p + '.self_attn.attn', query, qpos, mask, heads))
        query = _ln(sd, p + '.norms.1', query + _msda(sd, p + '.cross_attn', query + qpos, memory, rin, shapes, kpm, heads, L, P))
        query = _ln(sd, p + '.norms.2', query + _lin(sd, p + '.ffn.layers.1', F.relu(_lin(sd, p + '.ffn.layers.0.0', query))))
        x = ref.clamp(0, 1)
        new = (reg_b(lid, query) + torch.log(x.clamp(min=1e-3) / (1 - x).clamp(min=1e-3))).sigmoid()
        ref = new.detach()
        inter.append(_ln(sd, 'decoder.norm', query)); inter_refs.append(new)
    logits, boxes = [], []                                             # DeformableDETRHead.forward
    for l in range(n_dec):
        x = inter_refs[l].clamp(0, 1)
        logits.append(cls_b(l, inter[l])); boxes.append((reg_b(l, inter[l]) + torch.log(x.clamp(min=1e-5) / (1 - x).clamp(min=1e-5))).sigmoid())
    return torch.stack(logits), torch.stack(boxes), topk_score, topk_unact.sigmoid()


class _Fixed(nn.Module):
    "A backbone stub: returns fixed maps (the official forward is transcribed from the neck on)."
    def __init__(self, feats): super().__init__(); self.feats, self.channels = feats, [f.shape[1] for f in feats]
    def forward(self, x): return self.feats


def _tiny(seed=0):
    cfg = dict(d=16, heads=2, L=4, P=2, n_enc=1, n_dec=2, Q=12, groups=4, K=3)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in official_dino_layout((6, 8, 10), 4, 16, 2, 2, 24, 1, 2, 3, 12).items():
        sd[k] = torch.randn(s, generator=g, dtype=torch.float64) * (0.1 if len(s) == 1 else 1 / math.sqrt(math.prod(s[1:])))
        if k.endswith(('norms.0.weight', 'norms.1.weight', 'norms.2.weight', 'norm.weight', 'gn.weight')): sd[k] = sd[k] + 1
    sd['query_embedding.weight'] = torch.randn(12, 16, generator=g, dtype=torch.float64)
    feats = [torch.randn(2, c, s, s, generator=g, dtype=torch.float64) for c, s in ((6, 16), (8, 8), (10, 4))]
    m = DINO(_Fixed(feats), 3, d_model=16, n_heads=2, n_levels=4, n_points=2, n_enc=1, n_dec=2, d_ffn=24, n_queries=12, num_dn=4, gn_groups=4)
    m = m.double()                                                     # float64 before loading: no float32 rounding of the weights
    m.load_state_dict(convert_official_dino(sd), strict=True)
    return m, sd, feats, cfg


def test_converted_dino_equals_the_official_forward_float64():
    "Random official-layout tensors (tiny DINO) → converter → strict load; our test forward equals mmdet's, layer by layer, in float64."
    m, sd, feats, cfg = _tiny()
    images = [torch.rand(3, 64, 64, dtype=torch.float64), torch.rand(3, 48, 56, dtype=torch.float64)]
    x, mask, sizes = m.eval().batch_images(images)
    with torch.no_grad(): out = m.forward_outputs(x, mask)
    lg, bx, es, eb = _official(sd, feats, sizes, tuple(x.shape[-2:]), cfg)
    torch.testing.assert_close(out['logits'], lg, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out['boxes'], bx, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out['enc_logits'], es, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out['enc_boxes'], eb, rtol=1e-9, atol=1e-9)
    with torch.no_grad(): det = m(images)                               # mmdet `_predict_by_feat_single`: top 300 of sigmoid(logits)
    s, i = lg[-1, 1].sigmoid().flatten().topk(min(300, lg[-1, 1].numel()))
    torch.testing.assert_close(det[1]['scores'], s); assert torch.equal(det[1]['labels'], i % 3 + 1)


def test_training_forward_with_denoising_equals_the_official_float64():
    "In training, with the same denoising queries (mmdet's layout: label_embedding of the noised label, 0 for padding slots; inverse-sigmoid boxes), the outputs equal mmdet's."
    m, sd, feats, cfg = _tiny(1)
    images = [torch.rand(3, 64, 64, dtype=torch.float64), torch.rand(3, 48, 56, dtype=torch.float64)]
    x, mask, sizes = m.train().batch_images(images)
    tg = [dict(labels=torch.tensor([0, 2]), boxes=torch.tensor([[.3, .4, .2, .3], [.6, .5, .3, .4]], dtype=torch.float64)),
          dict(labels=torch.tensor([1]), boxes=torch.tensor([[.5, .5, .4, .2]], dtype=torch.float64))]
    torch.manual_seed(0)
    with torch.no_grad(): out = m.forward_outputs(x, mask, tg)
    dn = out['dn']; v = dn['valid'][..., None].to(torch.float64)
    assert out['n_dn'] == dn_groups(2, 4) * 2 * 2 == 8
    lab_q = sd['dn_query_generator.label_embedding.weight'][dn['labels'].clamp(max=2)] * v
    b = dn['boxes'].double().clamp(0, 1)                                # (dn_queries draws its noise in float32)
    box_q = torch.log(b.clamp(min=1e-3) / (1 - b).clamp(min=1e-3)) * v    # mmdet inverse_sigmoid(eps=1e-3); zeros where padded
    lg, bx, es, eb = _official(sd, feats, sizes, tuple(x.shape[-2:]), cfg, (lab_q, box_q, dn['attn_mask']))
    torch.testing.assert_close(out['logits'], lg, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out['boxes'], bx, rtol=1e-9, atol=1e-9)


def test_tiny_dino_learns_and_errors():
    "A tiny DINO overfits one synthetic image: the loss falls to a third, its two best detections are the two objects (right class, IoU > 0.7) and the third scores far lower (one-to-one: no duplicate); bad inputs raise errors naming the argument."
    from torchvision.ops import box_iou
    from xwlearn.vision.layers import TinyBackbone
    torch.manual_seed(0)
    m = DINO(TinyBackbone(widths=(8, 16, 16, 24, 32)), 2, d_model=32, n_heads=4, n_levels=4, n_points=2, n_enc=1, n_dec=2, d_ffn=64,
             n_queries=20, num_dn=8, gn_groups=8)
    im = torch.zeros(3, 64, 64); im[:, 8:30, 10:40] = 1.; im[0, 36:60, 30:50] = 1.
    tg = [dict(boxes=torch.tensor([[10., 8., 40., 30.], [30., 36., 50., 60.]]), labels=torch.tensor([1, 2]))]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=1e-4)
    hist = []
    for _ in range(80):
        loss = sum(m([im], tg).values()); opt.zero_grad(); loss.backward(); opt.step(); hist.append(loss.item())
    assert sum(hist[-5:]) / 5 < hist[0] / 3, (hist[0], hist[-5:])
    with torch.no_grad(): d = m.eval()([im])[0]
    assert sorted(d['labels'][:2].tolist()) == [1, 2]
    for b, l in zip(d['boxes'][:2], d['labels'][:2]): assert box_iou(b[None], tg[0]['boxes'][l - 1][None]).item() > 0.7
    assert d['scores'][2] < d['scores'][1] / 2, d['scores'][:3]
    m.train()
    with pytest.raises(ValueError, match='targets: a DINO in training mode'): m([im])
    with pytest.raises(ValueError, match='targets: expected one per image'): m([im, im], tg)
    with pytest.raises(TypeError, match='images: expected a non-empty list'): m(im)
    with pytest.raises(ValueError, match='k: expected'): select_queries(torch.zeros(1, 4, 2), torch.zeros(1, 4, 4), 5)
    with pytest.raises(ValueError, match='reference: expected'): dino_decode(m.decoder, m.reg_branches, torch.zeros(1, 2, 32), torch.zeros(1, 2, 2), None, None)
    with pytest.raises(ValueError, match='targets: expected one per image'): set_loss(torch.zeros(2, 3, 2), torch.zeros(2, 3, 4), [])
