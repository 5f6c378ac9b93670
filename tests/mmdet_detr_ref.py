"""Float64 transcriptions of mmcv/mmdet DETR building blocks, computed directly from official-layout state-dict tensors.

The DINO (`test_vision_dino_detr.py`) and DDQ-DETR (`test_ddq.py`) equality tests build their reference forwards from these
(one transcription of the official arithmetic, independent of xwlearn's modules)."""
import math
import torch
import torch.nn.functional as F

def lin(sd, p, x): return x @ sd[p + '.weight'].T + sd[p + '.bias']
def ln(sd, p, x): return F.layer_norm(x, x.shape[-1:], sd[p + '.weight'], sd[p + '.bias'])


def sine(v, num_feats, temperature):
    "mmdet: dim_t = T ** (2 (i // 2) / num_feats); sin of the even channels and cos of the odd ones, interleaved."
    dim_t = temperature ** (2 * (torch.arange(num_feats, dtype=torch.float64) // 2) / num_feats)
    p = v[..., None] / dim_t
    return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), -1).flatten(-2)


def msda(sd, p, query, value, ref, shapes, kpm, heads, L, P):
    "mmcv MultiScaleDeformableAttention (pytorch path), without its residual."
    bs, nq, _ = query.shape
    v = lin(sd, p + '.value_proj', value).masked_fill(kpm[..., None], 0.).view(bs, value.shape[1], heads, -1)
    off = lin(sd, p + '.sampling_offsets', query).view(bs, nq, heads, L, P, 2)
    aw = lin(sd, p + '.attention_weights', query).view(bs, nq, heads, L * P).softmax(-1).view(bs, nq, heads, L, P)
    if ref.shape[-1] == 2:
        loc = ref[:, :, None, :, None, :] + off / torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(query)[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + off / P * ref[:, :, None, :, None, 2:] * 0.5
    grids, outs, start = 2 * loc - 1, [], 0
    for l, (h, w) in enumerate(shapes.tolist()):
        vl = v[:, start:start + h * w].flatten(2).transpose(1, 2).reshape(bs * heads, -1, h, w); start += h * w
        outs.append(F.grid_sample(vl, grids[:, :, :, l].transpose(1, 2).flatten(0, 1), mode='bilinear', padding_mode='zeros', align_corners=False))
    a = aw.transpose(1, 2).reshape(bs * heads, 1, nq, L * P)
    return lin(sd, p + '.output_proj', (torch.stack(outs, -2).flatten(-2) * a).sum(-1).view(bs, -1, nq).transpose(1, 2))


def mha(sd, p, x, pos, mask, heads):
    "mmcv MultiheadAttention: query and key get the positional embedding, value does not; without its residual."
    B, T, d = x.shape
    W, b = sd[p + '.in_proj_weight'], sd[p + '.in_proj_bias']
    q, k, v = (x + pos) @ W[:d].T + b[:d], (x + pos) @ W[d:2 * d].T + b[d:2 * d], x @ W[2 * d:].T + b[2 * d:]
    sp = lambda t: t.view(B, T, heads, d // heads).transpose(1, 2)
    att = sp(q) @ sp(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None: att = att.masked_fill(mask.reshape(B, -1, T, T) if mask.dim() == 3 else mask, float('-inf'))  # (B·heads, T, T) or broadcastable
    return lin(sd, p + '.out_proj', (att.softmax(-1) @ sp(v)).transpose(1, 2).reshape(B, T, d))
