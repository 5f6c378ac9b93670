"Tests of xwlearn.vl.dino: DINO weights load with the official code's outputs (fixture written by facebookresearch/dino, float64) and timm's, the image and patch losses against their formulas, crop geometry, error messages, shapes, grouping scores."
import json, math
from pathlib import Path
import pytest
import torch
from xwlearn.vl.dino import (ViT, DINO_ARCHS, DINOHead, dino_loss, update_center, multi_crop, load_dino, group_scores,
                             pretrained_dino_lite, train_dino, TEST_DINO, patch_positions, dense_dino_loss)

torch.set_num_threads(1)
FX = Path(__file__).parent / "fixtures"
ARCH = dict(patch_size=8, embed_dim=24, depth=2, num_heads=3)

@pytest.fixture(scope="module")
def official(): return torch.load(FX / "dino_vit_tiny.pt", weights_only=True)

def _check(model, fx):
    with torch.no_grad():
        for x, o in zip(fx["inputs"], fx["outputs"]):                  # native grid, and 48×40 (DINO's interpolation)
            torch.testing.assert_close(model(x), o["cls"], rtol=0, atol=1e-12)
            torch.testing.assert_close(model.tokens(x), o["tokens"], rtol=0, atol=1e-12)
            torch.testing.assert_close(model.get_last_selfattention(x), o["attn"], rtol=0, atol=1e-12)

def test_released_backbone_equals_official_code(tmp_path, official):
    torch.save(official["state_dict"], tmp_path / "dino_deitsmall8_pretrain.pth")
    _check(load_dino(tmp_path / "dino_deitsmall8_pretrain.pth", ARCH, dtype=torch.float64), official)

@pytest.mark.parametrize("key,prefix", [("teacher", "backbone."), ("student", "module.backbone.")])
def test_training_checkpoint(tmp_path, official, key, prefix):
    sd = {prefix + k: v for k, v in official["state_dict"].items()}
    sd[prefix.replace("backbone.", "") + "head.mlp.0.weight"] = torch.zeros(4, 24)
    torch.save({key: sd, "epoch": 7}, tmp_path / "checkpoint.pth")
    _check(load_dino(tmp_path / "checkpoint.pth", ARCH, checkpoint_key=key, dtype=torch.float64), official)
    with pytest.raises(KeyError, match="key"): load_dino(tmp_path / "checkpoint.pth", ARCH, checkpoint_key="ema")

def test_timm_layout_equal_outputs(tmp_path):
    timm = pytest.importorskip("timm")
    tv = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=0).double().eval()
    with torch.no_grad():
        for p in tv.parameters(): p.add_(0.05 * torch.randn_like(p))
    torch.save(tv.state_dict(), tmp_path / "vit.pth")
    ours = load_dino(tmp_path / "vit.pth", ARCH, dtype=torch.float64); x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.tokens(x), tv.forward_features(x), rtol=0, atol=1e-12)

@pytest.mark.parametrize("arch", ["dino_vits8", "vit_small_patch8_224", "vit_small_patch8_224.dino"])
def test_real_layout_keys(arch):
    keys = json.loads((FX / "dino_vits8_keys.json").read_text())
    from xwlearn.vl.dino import _dino_arch
    with torch.device("meta"): m = ViT(**_dino_arch(arch)[1])                 # shapes only
    assert {k: list(v.shape) for k, v in m.state_dict().items()} == keys

def test_errors(tmp_path, official):
    with pytest.raises(FileNotFoundError, match="dino_vitbase8_pretrain") as e: load_dino(tmp_path / "w.pth", "dino_vitb8")
    assert "dl.fbaipublicfiles.com" in str(e.value) and "w.pth" in str(e.value)
    with pytest.raises(ValueError, match="arch"): load_dino(tmp_path / "w.pth", "dino_vitl7")
    torch.save(official["state_dict"], tmp_path / "w.pth")
    with pytest.raises(ValueError, match="does not fit"): load_dino(tmp_path / "w.pth", dict(ARCH, depth=3))
    with pytest.raises(ValueError, match="teacher"): dino_loss([torch.zeros(2, 3)], [torch.zeros(2, 3)] * 2, torch.zeros(3))

@pytest.mark.parametrize("n_g,n_l,K", [(2, 0, 3), (2, 4, 7), (1, 2, 5)])
def test_dino_loss_against_direct_formula(n_g, n_l, K):
    g = torch.Generator().manual_seed(K)
    s = [torch.randn(3, K, generator=g, dtype=torch.float64) for _ in range(n_g + n_l)]
    t = [torch.randn(3, K, generator=g, dtype=torch.float64) for _ in range(n_g)]
    c = torch.randn(K, generator=g, dtype=torch.float64)
    tot, n = 0.0, 0
    for i in range(n_g):
        for j in range(n_g + n_l):
            if i == j: continue
            for b in range(3):
                pt = [math.exp((t[i][b, k] - c[k]) / 0.04) for k in range(K)]; pt = [q / sum(pt) for q in pt]
                lse = math.log(sum(math.exp(s[j][b, k] / 0.1) for k in range(K)))
                tot -= sum(pt[k] * (s[j][b, k] / 0.1 - lse) for k in range(K)) / 3
            n += 1
    torch.testing.assert_close(dino_loss(s, t, c), torch.tensor(float(tot) / n, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    c2 = update_center(c.clone(), t, 0.8)
    torch.testing.assert_close(c2, 0.8 * c + 0.2 * torch.cat(t).mean(0))

def test_shapes():
    v = ViT(img_size=32, patch_size=4, embed_dim=16, depth=2, num_heads=2).eval(); x = torch.randn(2, 3, 32, 32)
    assert v.patch_tokens(x).shape == (2, 8, 8, 16) and v.patch_tokens(torch.randn(1, 3, 16, 24)).shape == (1, 4, 6, 16)
    p = v.last_block(x)
    assert p["q"].shape == (2, 2, 65, 8) and p["weights"].shape == (2, 2, 65, 65) and p["grid"] == (8, 8)
    assert DINOHead(16, 32)(torch.randn(5, 16)).shape == (5, 32)
    crops = multi_crop(torch.randn(4, 3, 32, 32), n_local=3, generator=torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3

def test_group_scores_perfect_and_permuted():
    sem = torch.zeros(3, 8, 8, dtype=torch.long); sem[:, 4:] = 1; sem[:, :, 4:] += 2       # four quadrant classes
    f = torch.nn.functional.one_hot(torch.tensor([[2, 3], [0, 1]]), 4).float().expand(3, 2, 2, 4)   # features of 2×2 patches, classes permuted
    r = group_scores(f, sem, 4)
    assert r["mIoU"] == pytest.approx(1.0) and sorted(r["clusters_to_classes"].tolist()) == [0, 1, 2, 3]

def test_test_scale_trains_without_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XWLEARN_CACHE", str(tmp_path / "cache"))
    m = pretrained_dino_lite("test", steps=2)
    assert m.info["steps"] == 2 and not (tmp_path / "cache").exists()
    assert torch.isfinite(m.patch_tokens(torch.randn(1, 3, 32, 32))).all()

def _coords():
    x = torch.arange(32.).expand(1, 1, 32, 32) + 0.5
    return torch.cat([x, x.transpose(-1, -2), torch.zeros_like(x)], 1).expand(3, 3, 32, 32)    # each pixel holds its (x, y)

@pytest.mark.parametrize("seed", [0, 5])
def test_crop_boxes_locate_patches(seed):
    crops, boxes = multi_crop(_coords(), n_local=3, generator=torch.Generator().manual_seed(seed), boxes=True)
    assert all(torch.equal(a, b) for a, b in zip(crops, multi_crop(_coords(), n_local=3, generator=torch.Generator().manual_seed(seed))))
    assert [tuple(b.shape) for b in boxes] == [(3, 5)] * 5 and {float(v) for b in boxes for v in b[:, 4]} <= {0.0, 1.0}
    for c, b in zip(crops, boxes):                                   # the mean (x, y) of a patch's pixels = its centre's image point
        pos = patch_positions(b, c.shape[-1] // 4).permute(0, 3, 1, 2)
        torch.testing.assert_close(pos, torch.nn.functional.avg_pool2d(c, 4)[:, :2], rtol=0, atol=0.1)

def _bilinear(P, px, py):
    m = P.shape[0]; px, py = min(max(px, 0), m - 1), min(max(py, 0), m - 1)
    x0, y0 = min(int(px), m - 2), min(int(py), m - 2); wx, wy = px - x0, py - y0
    return (1 - wy) * ((1 - wx) * P[y0, x0] + wx * P[y0, x0 + 1]) + wy * ((1 - wx) * P[y0 + 1, x0] + wx * P[y0 + 1, x0 + 1])

def test_dense_loss_against_direct_formula():
    g = torch.Generator().manual_seed(1); K = 4
    _, bx = multi_crop(torch.zeros(2, 3, 32, 32), n_local=1, generator=g, boxes=True)
    tea = [torch.randn(2, 4, 4, K, generator=g, dtype=torch.float64) for _ in range(2)]
    stu = tea[:1] + [torch.randn(2, 4, 4, K, generator=g, dtype=torch.float64), torch.randn(2, 2, 2, K, generator=g, dtype=torch.float64)]
    c = torch.randn(K, generator=g, dtype=torch.float64); tot, npair = 0.0, 0
    for a in range(2):
        for b in range(3):
            if a == b: continue
            terms = []
            for i in range(2):
                A, B, n = bx[a][i].tolist(), bx[b][i].tolist(), stu[b].shape[1]
                P = torch.softmax((tea[a][i] - c) / 0.04, -1)
                for r in range(n):
                    for q in range(n):
                        fx = (q + 0.5) / n; fx = 1 - fx if B[4] else fx
                        u, v = (B[1] + fx * B[3] - A[1]) / A[3], (B[0] + (r + 0.5) / n * B[2] - A[0]) / A[2]
                        u = 1 - u if A[4] else u
                        if 0 <= u <= 1 and 0 <= v <= 1:
                            p = _bilinear(P, u * 4 - 0.5, v * 4 - 0.5)
                            terms.append(float(-(p * torch.log_softmax(stu[b][i, r, q] / 0.1, -1)).sum()))
            tot += sum(terms) / max(len(terms), 1); npair += 1
    torch.testing.assert_close(dense_dino_loss(stu, tea, bx, c), torch.tensor(tot / npair, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="boxes"): dense_dino_loss(stu, tea, bx[:2], c)
    with pytest.raises(ValueError, match="teacher"): dense_dino_loss(stu[:1], tea, bx[:1], c)

def test_dense_loss_identical_views_is_entropy():
    "Two global crops of the same box: the loss is the cross-entropy at equal positions (no interpolation), min when student = teacher's sharpened target."
    box = torch.tensor([[4., 2., 24., 24., 0.]])
    t = torch.randn(1, 6, 6, 5, dtype=torch.float64); c = torch.zeros(5, dtype=torch.float64)
    p = torch.softmax(t / 0.04, -1)
    want = float(-(p * torch.log_softmax(t / 0.1, -1)).sum(-1).mean())
    torch.testing.assert_close(dense_dino_loss([t, t], [t, t], [box, box], c), torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)
