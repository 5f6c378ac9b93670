"Tests of xwlearn.vl.clip: open_clip weights load with equal embeddings (float64, released and training checkpoint formats), InfoNCE against its formula, error messages, shapes, the one-training-per-machine cache."
import ast, json, math, multiprocessing as mp, sys, time
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
import xwlearn.vl.clip as vc
from xwlearn.vl.clip import (CLIP, CaptionTokenizer, cached_training, clip_loss, load_open_clip, pretrained_tiny_clip,
                             scene_tensor, captioned_scenes, held_out_pairs)

torch.set_num_threads(1)
CFG = dict(embed_dim=24, vision_cfg=dict(image_size=32, layers=2, width=48, patch_size=8, head_width=16),
           text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=2))

def _open_clip_model(tmp_path, name, cfg):
    open_clip = pytest.importorskip("open_clip")
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    ref = open_clip.create_model(name, pretrained=None).double().eval()
    with torch.no_grad():
        for p in ref.parameters(): p.add_(0.05 * torch.randn_like(p))
    return ref

def _assert_same(ours, ref, patch=True):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    t = torch.randint(1, 63, (2, 16)); t[0, 5] = t[1, 15] = 63
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), ref.encode_image(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.encode_text(t), ref.encode_text(t), rtol=0, atol=1e-12)
        if patch:
            ref.visual.output_tokens = True
            _, tokens = ref.visual(x)
            torch.testing.assert_close(ours.visual.dense(x).flatten(1, 2), tokens @ ref.visual.proj, rtol=0, atol=1e-12)

@pytest.mark.parametrize("variant", [dict(), dict(quick_gelu=True), dict(vision_cfg=dict(CFG['vision_cfg'], ls_init_value=0.1, pool_type='avg'))])
def test_released_checkpoint_equal_embeddings(tmp_path, variant):
    cfg = dict(CFG, **variant); name = f"xw_tiny_{abs(hash(json.dumps(cfg, sort_keys=True))) % 10**8}"
    ref = _open_clip_model(tmp_path, name, cfg)
    torch.save(ref.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    _assert_same(load_open_clip(tmp_path / "open_clip_pytorch_model.bin", name, dtype=torch.float64), ref)

def test_training_checkpoint_and_safetensors(tmp_path):
    ref = _open_clip_model(tmp_path, "xw_tiny_ckpt", CFG)
    torch.save(dict(epoch=2, state_dict={f"module.{k}": v for k, v in ref.state_dict().items()}), tmp_path / "epoch_2.pt")
    _assert_same(load_open_clip(tmp_path / "epoch_2.pt", CFG, dtype=torch.float64), ref, patch=False)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    _assert_same(load_open_clip(tmp_path / "open_clip_model.safetensors", CFG, dtype=torch.float64), ref, patch=False)

def test_missing_file_names_file_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin") as e:
        load_open_clip(tmp_path / "open_clip_pytorch_model.bin", CFG)
    assert "create_model" in str(e.value) and "Hugging Face" in str(e.value)

def test_wrong_arch_errors(tmp_path):
    torch.save(CLIP(**CFG).state_dict(), tmp_path / "w.bin")
    with pytest.raises(ValueError, match="does not fit"): load_open_clip(tmp_path / "w.bin", dict(CFG, embed_dim=24, vision_cfg=dict(CFG['vision_cfg'], layers=3)))
    with pytest.raises(TypeError, match="arch"): load_open_clip(tmp_path / "w.bin", 3)
    pytest.importorskip("open_clip")
    with pytest.raises(ValueError, match="arch"): load_open_clip(tmp_path / "w.bin", "ViT-Nonexistent-7")
    with pytest.raises(ValueError, match="attentional_pool"): CLIP(**dict(CFG, vision_cfg=dict(CFG['vision_cfg'], attentional_pool=True)))

def test_imports_without_open_clip(tmp_path, monkeypatch):
    for mod in (vc, pytest.importorskip("xwlearn.vl.dino")):
        top = [n for n in ast.parse(Path(mod.__file__).read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not any(n.split(".")[0] in ("open_clip", "timm", "transformers") for n in names), names
    monkeypatch.setitem(sys.modules, "open_clip", None)
    torch.save(CLIP(**CFG).state_dict(), tmp_path / "w.bin")
    with pytest.raises(ImportError, match=r"xwlearn\[vl\]"): load_open_clip(tmp_path / "w.bin", "ViT-B-16")
    assert isinstance(load_open_clip(tmp_path / "w.bin", CFG), CLIP)               # a config dict needs no open_clip

@pytest.mark.parametrize("B,D,s", [(1, 3, 1.0), (6, 8, 14.3), (9, 5, 100.0)])
def test_infonce_against_direct_formula(B, D, s):
    g = torch.Generator().manual_seed(B)
    u = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    w = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    L = s * u @ w.T
    direct = -sum(L[i, i] - math.log(sum(math.exp(L[i, j]) for j in range(B)))
                  + L[i, i] - math.log(sum(math.exp(L[j, i]) for j in range(B))) for i in range(B)) / (2 * B)
    torch.testing.assert_close(clip_loss(u, w, s), torch.tensor(direct, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="image_emb, text_emb"): clip_loss(u, w[:, :-1], s)

def test_shapes_and_last_block():
    m = CLIP(**CFG).eval(); x = torch.randn(2, 3, 32, 32)
    p = m.visual.last_block(x)
    assert set(p) >= {"x", "q", "k", "v", "attn", "resid", "mlp", "out", "grid"}
    assert p["q"].shape == (2, 3, 17, 16) and p["grid"] == (4, 4)
    assert m.visual.dense(x).shape == (2, 4, 4, 24) and m.visual.dense(torch.randn(1, 3, 40, 24)).shape == (1, 5, 3, 24)
    torch.testing.assert_close(m.visual.pool(p["out"]), m.encode_image(x))
    tok = CaptionTokenizer(16)
    assert m.encode_text(torch.randint(1, 60, (3, 16))).shape == (3, 24)
    ids = tok("a red striped circle and a blue square with sky above grass.")
    assert ids.shape == (1, 16) and ids[0, 0] == tok.vocab_size - 2 and ids[0].argmax() == 1 + 12   # <sot>, 12 words, <eot>

def test_train_split_excludes_held_out_pairs():
    sc, keep, caps = captioned_scenes(80, seed=3, split="train")
    ho = {f"{c} {s}" for c, s in held_out_pairs()}
    assert len(caps) == len(keep) > 0
    assert not any(h in c.replace(" striped", "").replace(" dotted", "") for c in caps for h in ho)
    with pytest.raises(ValueError, match="split"): captioned_scenes(4, split="test")

def _fit_slowly(s, partial):
    with open(s["log"], "a") as f: f.write("trained\n")
    time.sleep(0.5)
    return dict(w=torch.ones(1))

def _call(root, log): cached_training("lock_test", dict(log=str(log)), _fit_slowly, (_fit_slowly,), root=root)

def test_two_processes_train_once(tmp_path):
    ctx = mp.get_context("fork")
    ps = [ctx.Process(target=_call, args=(tmp_path, tmp_path / "log.txt")) for _ in range(2)]
    for p in ps: p.start()
    for p in ps: p.join(30)
    assert [p.exitcode for p in ps] == [0, 0]
    assert (tmp_path / "log.txt").read_text() == "trained\n"
    assert len(list((tmp_path / "vl").glob("lock_test-*/model.pt"))) == 1

def test_scale_from_env_and_errors(monkeypatch):
    monkeypatch.setenv("XWLEARN_VL_SCALE", "huge")
    with pytest.raises(ValueError, match="scale"): pretrained_tiny_clip()
    monkeypatch.setenv("XWLEARN_VL_SCALE", "test")
    m, tok = pretrained_tiny_clip(steps=2)
    e = m.encode_image(scene_tensor(captioned_scenes(2, seed=5, split="all")[0].images))
    assert e.shape == (2, vc.TEST_CLIP["embed_dim"]) and torch.isfinite(e).all() and m.info["steps"] == 2

@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_tiny_clip_config_is_an_open_clip_config(tmp_path, pool):
    "The tiny CLIP's config (either pooling) builds an open_clip `CLIP` whose weights load into ours with equal outputs; 'avg' = mean of `dense`."
    open_clip = pytest.importorskip("open_clip")
    s = dict(vc.TEST_CLIP, pool=pool)
    cfg = vc.tiny_clip_config(s)
    assert cfg["vision_cfg"]["pool_type"] == pool
    ref = open_clip.CLIP(**cfg).double().eval()
    with torch.no_grad():
        for p in ref.parameters(): p.add_(0.05 * torch.randn_like(p))
    torch.save(ref.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    ours = load_open_clip(tmp_path / "open_clip_pytorch_model.bin", cfg, dtype=torch.float64)
    sc, keep, caps = captioned_scenes(3, seed=7, split="all")
    x, t = scene_tensor(sc.images).double(), CaptionTokenizer(s["context"])(caps)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), ref.encode_image(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.encode_text(t), ref.encode_text(t), rtol=0, atol=1e-12)
        ref.visual.output_tokens = True
        _, tokens = ref.visual(x)
        dense = ours.visual.dense(x)
        torch.testing.assert_close(dense.flatten(1, 2), tokens @ ref.visual.proj, rtol=0, atol=1e-12)
        mean_dense = torch.allclose(ours.encode_image(x), dense.mean((1, 2)), rtol=0, atol=1e-12)
    assert mean_dense == (pool == "avg")      # avg pooling: the image embedding is the mean of the projected patch tokens
    assert vc.TINY_CLIP["pool"] == "avg" and vc.tiny_clip_config({k: v for k, v in s.items() if k != "pool"})["vision_cfg"]["pool_type"] == "tok"
