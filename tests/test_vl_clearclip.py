"Tests of xwlearn.vl.clearclip: the switchable last block against open_clip's own modules (random weights, float64), invariants of each attention form, the statistics, error messages."
import json
import pytest
import torch
import torch.nn.functional as F
from xwlearn.vl.clip import CLIP, load_open_clip
from xwlearn.vl.clearclip import ATTENTIONS, PRESETS, ClearBlock, clear_attention, clear_dense, decomposition_stats, spatial_variance

torch.set_num_threads(1)
CFG = dict(embed_dim=24, vision_cfg=dict(image_size=32, layers=2, width=48, patch_size=8, head_width=16),
           text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1))

def _model(seed=0, **vision):
    torch.manual_seed(seed)
    return CLIP(**dict(CFG, vision_cfg=dict(CFG['vision_cfg'], **vision))).double().eval()

def _ref_dense(v, x, attn):
    "open_clip's VisionTransformer modules, run by hand: blocks 1..L-1 as open_clip runs them, then the modified last block."
    t = v._embeds(x)
    for b in v.transformer.resblocks[:-1]: t = b(t)
    blk = v.transformer.resblocks[-1]; B, N, D = t.shape; H = blk.attn.num_heads
    q, k, val = (z.reshape(B, N, H, D // H).transpose(1, 2) for z in F.linear(blk.ln_1(t), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, -1))
    w = {'qq': lambda: torch.softmax(q @ q.transpose(-1, -2) * (D // H) ** -0.5, -1),
         'v': lambda: torch.eye(N, dtype=x.dtype).expand(B, H, N, N),
         'qq+kk': lambda: torch.softmax(q @ q.transpose(-1, -2) * (D // H) ** -0.5, -1) + torch.softmax(k @ k.transpose(-1, -2) * (D // H) ** -0.5, -1)}[attn]()
    o = blk.attn.out_proj((w @ val).transpose(1, 2).reshape(B, N, D))
    return (v.ln_post(o[:, 1:]) @ v.proj).reshape(B, 4, 4, -1)

def test_open_clip_layout_weights(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    (tmp_path/"xw_cc_tiny.json").write_text(json.dumps(CFG)); open_clip.add_model_config(tmp_path/"xw_cc_tiny.json")
    torch.manual_seed(0)
    ref = open_clip.create_model("xw_cc_tiny", pretrained=None).double().eval()
    with torch.no_grad():
        for p in ref.parameters(): p.add_(0.05 * torch.randn_like(p))
    torch.save(ref.state_dict(), tmp_path/"open_clip_pytorch_model.bin")
    ours = load_open_clip(tmp_path/"open_clip_pytorch_model.bin", "xw_cc_tiny", dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref.visual.output_tokens = True
        _, tokens = ref.visual(x)
        torch.testing.assert_close(clear_dense(ours, **PRESETS['vanilla'])(x), (tokens @ ref.visual.proj).reshape(2, 4, 4, -1), rtol=0, atol=1e-12)
        for name, attn in (('clearclip', 'qq'), ('maskclip', 'v'), ('sclip', 'qq+kk')):
            torch.testing.assert_close(clear_dense(ours, **PRESETS[name])(x), _ref_dense(ref.visual, x, attn), rtol=0, atol=1e-12)

def test_vanilla_is_dense_exactly_and_layerscale_kept():
    m = _model(ls_init_value=0.3)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(clear_dense(m, **PRESETS['vanilla'])(x), m.visual.dense(x))
        p = m.visual.last_block(x); blk = m.visual.transformer.resblocks[-1]     # no residual, no FFN, q-k: ls_1(attn) alone
        torch.testing.assert_close(clear_dense(m.visual, 'qk')(x), m.visual.project(blk.ls_1(p['attn'])[:, 1:]).reshape(3, 4, 4, -1), rtol=0, atol=1e-12)

@pytest.mark.parametrize("attn", ATTENTIONS)
def test_attention_forms_invariants(attn):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 7, 5, dtype=torch.float64) for _ in range(3))
    o = clear_attention(q, k, v, attn)
    assert o.shape == v.shape
    perm = torch.randperm(7)                                   # every form is permutation-equivariant over tokens
    torch.testing.assert_close(clear_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], attn), o[:, :, perm], rtol=0, atol=1e-12)
    same = torch.ones_like(q)                                  # identical rows → uniform weights → the mean value
    if attn in ('qq', 'kk', 'qk', 'qq+kk'):
        o1 = clear_attention(same, same, v, attn)
        torch.testing.assert_close(o1, (2 if attn == 'qq+kk' else 1) * v.mean(2, keepdim=True).expand_as(v), rtol=0, atol=1e-12)

def test_maskclip_is_local_and_clearclip_is_not():
    m = _model(1)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        blk = m.visual.transformer.resblocks[-1]
        t = torch.randn(1, 17, 48, dtype=torch.float64); t2 = t.clone(); t2[:, 5] += 1.0   # change one token of the block input
        for attn, local in (('v', True), ('qq', False)):
            d = (ClearBlock(blk, attn)(t2) - ClearBlock(blk, attn)(t)).abs().sum(-1)[0]
            assert d[5] > 0 and ((d[torch.arange(17) != 5].max() == 0) == local), (attn, d)

def test_spatial_variance_and_stats():
    f = torch.randn(4, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(spatial_variance(3 * f), spatial_variance(f), rtol=0, atol=1e-12)          # scale-free
    torch.testing.assert_close(spatial_variance(f[:, torch.randperm(9)]), spatial_variance(f), rtol=0, atol=1e-12)
    assert ((spatial_variance(f) >= 0) & (spatial_variance(f) <= 1)).all()
    assert spatial_variance(torch.ones(1, 9, 6)).item() == 0
    st = decomposition_stats(_model(2), torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert set(st) == {f'{s}_{k}' for s in ('norm', 'svar') for k in ('res', 'attn', 'ffn')} and all(len(v) == 2 for v in st.values())

def test_errors():
    m = _model()
    with pytest.raises(ValueError, match="attn: expected one of"): clear_dense(m, 'qv')
    with pytest.raises(TypeError, match="ffn: expected a bool"): clear_dense(m, 'qq', ffn='yes')
    with pytest.raises(ValueError, match="leave nothing"): ClearBlock(m.visual.transformer.resblocks[-1], None)
    with pytest.raises(TypeError, match="block"): ClearBlock(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="model"): clear_dense(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="attn"): clear_attention(*(torch.zeros(1, 1, 2, 2),) * 3, attn='q')
