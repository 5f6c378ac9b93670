"Tests of xwlearn.vl.proxyclip and its recipes: vectorised = naive per-head loop (float64), the reduction to ClearCLIP's q–q attention, open_clip/timm layouts, invariants, errors, the five recipes on fixtures with random-weight checkpoints."
import ast, json, os
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
from xwlearn.vl.proxyclip import proxy_attention, resize_values, proxy_tokens, ProxyCLIP
from xwlearn.vl.clip import CLIP, TEST_CLIP, tiny_clip_config, load_open_clip
from xwlearn.vl.dino import ViT, TEST_DINO, dino_lite_backbone, load_dino

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

def _naive_attention(f, beta, gamma, mask):
    "One image, one row at a time (float64)."
    fh = f / f.norm(dim=-1, keepdim=True)
    Sp = gamma * ((S := torch.stack([fh @ fh[i] for i in range(len(fh))])) - beta * S.mean())
    rows = []
    for i, r in enumerate(Sp):
        if mask: r = torch.where((r < 0) & (torch.arange(len(r)) != i), float('-inf'), r)
        e = torch.exp(r - r.max()); rows.append(e / e.sum())
    return torch.stack(rows)

def _naive_tokens(block, v, grid, f, size, beta=1.2, gamma=3.0, mask=True):
    "Per image, per head: resize that head's values, apply the attention, out_proj (the official order of operations)."
    B, heads, _, d = v.shape; (h, w), (H, W) = grid, size
    out = torch.zeros(B, H * W, heads * d, dtype=v.dtype)
    for b in range(B):
        A = _naive_attention(f[b], beta, gamma, mask)
        for i in range(heads):
            vh = F.interpolate(v[b, i, 1:].T.reshape(1, d, h, w), size=(H, W), mode='bilinear', align_corners=False)
            out[b, :, i * d:(i + 1) * d] = A @ vh.reshape(d, H * W).T
    return block.attn.out_proj(out)

@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0); return CLIP(**tiny_clip_config(TEST_CLIP)).double().eval()

@pytest.mark.parametrize("up,kw", [(1, dict()), (2, dict()), (2, dict(beta=0.0, gamma=1.0, mask=False)), (1, dict(beta=1.6, gamma=5.0)),
                                   (1, dict(beta=-0.4, gamma=0.5))])
def test_vectorised_equals_naive(clip, up, kw):
    g = torch.Generator().manual_seed(up)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=g)
    p = clip.visual.last_block(x); h, w = p['grid']
    f = torch.randn(2, up * h * up * w, 10, dtype=torch.float64, generator=g) + 0.8
    blk = clip.visual.transformer.resblocks[-1]
    with torch.no_grad():
        torch.testing.assert_close(proxy_tokens(blk, p, f.reshape(2, up * h, up * w, -1), **kw),
                                   _naive_tokens(blk, p['v'], (h, w), f, (up * h, up * w), **kw), rtol=0, atol=1e-12)

def _qq(parts, block, normalise=True):
    "ClearCLIP-style q–q on patch tokens from `last_block` outputs: out_proj(softmax(q̂q̂ᵀ/√d) v), per head."
    q, v = parts['q'][:, :, 1:], parts['v'][:, :, 1:]
    if normalise: q = F.normalize(q, dim=-1)
    A = (q @ q.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    return block.attn.out_proj((A @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)), A

def test_reduces_to_clearclip_qq_attention():
    torch.manual_seed(3)
    clip1 = CLIP(**tiny_clip_config(dict(TEST_CLIP, heads=1))).double().eval()        # one head
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        p = clip1.visual.last_block(x); blk = clip1.visual.transformer.resblocks[-1]; d = p['q'].shape[-1]
        q = p['q'][:, 0, 1:].reshape(3, *p['grid'], d)                                 # F = CLIP's own queries
        ref, A = _qq(p, blk)
        torch.testing.assert_close(proxy_tokens(blk, p, q, beta=0.0, gamma=d ** -0.5, mask=False), ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(proxy_tokens(blk, p, q, beta=1.2, gamma=d ** -0.5, mask=False), ref, rtol=0, atol=1e-12)  # shift cancels
        # the whole dense path, with CLIP's own queries as the VFM
        pc = ProxyCLIP(clip1, lambda im: clip1.visual.last_block(im)['q'][:, 0, 1:].reshape(im.shape[0], *p['grid'], d),
                       beta=0.0, gamma=d ** -0.5, mask=False)
        torch.testing.assert_close(pc.dense(x).reshape(3, -1, clip1.visual.output_dim), clip1.visual.project(ref), rtol=0, atol=1e-12)
        # raw queries: equal only with equal norms r and γ = r²/√d
        pe = dict(p, q=2.0 * F.normalize(p['q'], dim=-1))
        torch.testing.assert_close(proxy_tokens(blk, pe, q, beta=0.0, gamma=4.0 * d ** -0.5, mask=False), _qq(pe, blk, False)[0], rtol=0, atol=1e-12)
        nq = p['q'][:, 0, 1:].norm(dim=-1).mean()
        gap = (proxy_attention(q.reshape(3, -1, d), 0.0, float(nq) ** 2 * d ** -0.5, False) - _qq(p, blk, False)[1][:, 0]).abs().max()
        assert gap > 1e-3, gap
        # the mask breaks the equality (pairs with negative cosine are cut)
        assert not torch.allclose(proxy_tokens(blk, p, q, beta=0.0, gamma=d ** -0.5, mask=True), ref)

def test_multi_head_qq_head_by_head(clip):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        p = clip.visual.last_block(x); blk = clip.visual.transformer.resblocks[-1]; d = p['q'].shape[-1]
        A = _qq(p, blk)[1]
        for i in range(p['q'].shape[1]):
            torch.testing.assert_close(proxy_attention(p['q'][:, i, 1:], 0.0, d ** -0.5, False), A[:, i], rtol=0, atol=1e-12)

def test_invariants():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(3, 20, 6, dtype=torch.float64, generator=g) + 0.5
    A = proxy_attention(f)
    torch.testing.assert_close(A.sum(-1), torch.ones(3, 20, dtype=torch.float64), rtol=0, atol=1e-12)
    perm = torch.randperm(20, generator=g)                                              # relabelling the patches
    torch.testing.assert_close(proxy_attention(f[:, perm]), A[:, perm][:, :, perm], rtol=0, atol=1e-12)
    torch.testing.assert_close(proxy_attention(7.0 * f), A, rtol=0, atol=1e-12)         # features are L2-normalised
    S = F.normalize(f, dim=-1) @ F.normalize(f, dim=-1).transpose(1, 2)
    cut = (S < 1.2 * S.mean(dim=(1, 2), keepdim=True)) & ~torch.eye(20, dtype=torch.bool)
    for gamma in (0.5, 3.0, 9.0): assert ((proxy_attention(f, 1.2, gamma) == 0) == cut).all()   # the mask depends on β only
    torch.testing.assert_close(proxy_attention(f[:1], mean='batch'), proxy_attention(f[:1]), rtol=0, atol=1e-15)
    assert not torch.allclose(proxy_attention(f, mean='batch'), A)
    torch.testing.assert_close(proxy_attention(torch.ones(1, 4, 3)), torch.eye(4)[None])   # all masked: the diagonal stays, no NaN

def test_resize_values_identity_and_bilinear():
    v = torch.randn(2, 12, 5, dtype=torch.float64)
    assert resize_values(v, (3, 4), (3, 4)) is v
    up = resize_values(v, (3, 4), (6, 8))
    ref = F.interpolate(v.transpose(1, 2).reshape(2, 5, 3, 4), size=(6, 8), mode='bilinear', align_corners=False)
    torch.testing.assert_close(up, ref.reshape(2, 5, 48).transpose(1, 2), rtol=0, atol=0)

def test_errors(clip):
    f = torch.randn(2, 16, 4)
    with pytest.raises(ValueError, match="gamma"): proxy_attention(f, gamma=0)
    with pytest.raises(ValueError, match="feats"): proxy_attention(f[0])
    with pytest.raises(ValueError, match="mean"): proxy_attention(f, mean='all')
    with pytest.raises(ValueError, match="grid"): resize_values(f, (3, 3), (4, 4))
    vfm = dino_lite_backbone(TEST_DINO).double()
    with pytest.raises(TypeError, match="clip"): ProxyCLIP(torch.nn.Linear(2, 2), vfm)
    with pytest.raises(TypeError, match="vfm"): ProxyCLIP(clip, 'dino')
    with pytest.raises(ValueError, match="gamma"): ProxyCLIP(clip, vfm, gamma=-1.0)
    p = clip.visual.last_block(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="images"): proxy_tokens(clip.visual.transformer.resblocks[-1], p, torch.randn(1, 8, 8, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="feats"): proxy_tokens(clip.visual.transformer.resblocks[-1], p, torch.randn(2, 64, 4, dtype=torch.float64))

def test_open_clip_and_timm_layouts(tmp_path):
    open_clip = pytest.importorskip("open_clip"); timm = pytest.importorskip("timm")
    cfg = dict(embed_dim=24, vision_cfg=dict(image_size=32, layers=2, width=48, patch_size=8, head_width=16),
               text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1))
    (tmp_path / 'xw_pc_test.json').write_text(json.dumps(cfg)); open_clip.add_model_config(tmp_path / 'xw_pc_test.json')
    torch.manual_seed(4)
    ref = open_clip.create_model('xw_pc_test', pretrained=None).double().eval()
    with torch.no_grad():
        for q in ref.parameters(): q.add_(0.05 * torch.randn_like(q))
    torch.save(ref.state_dict(), tmp_path / 'open_clip_pytorch_model.bin')
    tv = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=24, depth=2, num_heads=3, num_classes=0).double().eval()
    torch.save(tv.state_dict(), tmp_path / 'vit.pth')
    ours = ProxyCLIP(load_open_clip(tmp_path / 'open_clip_pytorch_model.bin', 'xw_pc_test', dtype=torch.float64),
                     load_dino(tmp_path / 'vit.pth', dict(patch_size=4, embed_dim=24, depth=2, num_heads=3), dtype=torch.float64))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    seen = {}
    hook = ref.visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        ref.visual(x); hook.remove()
        rb = ref.visual.transformer.resblocks[-1]
        xin = seen['x'] if seen['x'].shape[0] == 2 else seen['x'].transpose(0, 1)
        v = F.linear(rb.ln_1(xin), rb.attn.in_proj_weight, rb.attn.in_proj_bias).chunk(3, -1)[2]
        v = v.reshape(2, xin.shape[1], rb.attn.num_heads, -1).transpose(1, 2)
        z = ref.visual.ln_post(_naive_tokens(rb, v, (4, 4), tv.forward_features(x)[:, 1:], (8, 8))) @ ref.visual.proj
        torch.testing.assert_close(ours.dense(x).reshape(2, -1, 24), z, rtol=0, atol=1e-12)

def test_module_imports_no_extra():
    for f in ('xwlearn/vl/proxyclip.py', 'xwlearn/repro/proxyclip.py'):
        top = [n for n in ast.parse((ROOT / f).read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not any(n.split(".")[0] in ("open_clip", "timm", "transformers", "matplotlib") for n in names), (f, names)

def _weights(d):
    open_clip = pytest.importorskip("open_clip")
    cfg = dict(embed_dim=32, quick_gelu=True, vision_cfg=dict(image_size=56, layers=1, width=32, patch_size=8, head_width=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    (d / 'clip.json').write_text(json.dumps(cfg)); open_clip.add_model_config(d / 'clip.json')
    dino = dict(patch_size=4, embed_dim=24, depth=1, num_heads=3); (d / 'dino.json').write_text(json.dumps(dino))
    torch.manual_seed(0)
    torch.save(open_clip.create_model('clip', pretrained=None).state_dict(), d / 'clip.bin')
    torch.save(ViT(img_size=56, **dino).state_dict(), d / 'dino.pth')
    return dict(XWLEARN_CLIP_WEIGHTS=str(d / 'clip.bin'), XWLEARN_CLIP_ARCH=str(d / 'clip.json'),
                XWLEARN_DINO_WEIGHTS=str(d / 'dino.pth'), XWLEARN_DINO_ARCH=str(d / 'dino.json'))

@pytest.mark.parametrize("ds", ['context', 'cocostuff', 'cityscapes', 'ade20k'])
def test_recipes_smoke_on_fixtures(tmp_path, monkeypatch, ds):
    from xwlearn.repro.proxyclip import PROXYCLIP_DATASETS
    from xwlearn.repro.kit import smoke_run
    from xwlearn.vl.openvocab import BENCHMARKS
    from xwlearn.vision.datasets import write_fixture
    for k, v in _weights(tmp_path).items(): monkeypatch.setenv(k, v)
    keys = PROXYCLIP_DATASETS[ds]['keys']
    write_fixture(BENCHMARKS[keys[0]].card, tmp_path / 'data', n=2)
    res = smoke_run(f'proxyclip_{ds}_vit_b16_dino_b8', tmp_path / 'data', tmp_path / 'runs')
    assert set(res) == set(keys) and all(0 <= r['mIoU'] <= 1 and r['n_images'] >= 1 for r in res.values()), res
    assert (tmp_path / 'runs' / f'proxyclip_{ds}_vit_b16_dino_b8' / 'results.json').exists()

def test_missing_weights_named(tmp_path, monkeypatch):
    from xwlearn.repro.proxyclip import proxyclip_models
    for k in ('XWLEARN_CLIP_WEIGHTS', 'XWLEARN_DINO_WEIGHTS'): monkeypatch.delenv(k, raising=False)
    with pytest.raises(FileNotFoundError) as e: proxyclip_models()
    assert 'XWLEARN_CLIP_WEIGHTS' in str(e.value) and 'dino_vitbase8_pretrain.pth' in str(e.value)
    w = _weights(tmp_path)
    with pytest.raises(FileNotFoundError) as e: proxyclip_models(w['XWLEARN_CLIP_WEIGHTS'], tmp_path / 'nope.pth')
    assert 'nope.pth' in str(e.value) and 'clip.bin' not in str(e.value)          # only the missing file is named
