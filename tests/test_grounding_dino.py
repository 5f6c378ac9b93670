"""MM-Grounding-DINO (xwlearn.detection.grounding_dino): pieces against naive float64 versions, the whole detector
against HF transformers' `MMGroundingDinoForObjectDetection` (random tiny config, offline) in float64, the key manifest
of the released Swin-T layout, training/inference behaviour and input errors."""
import copy, json, math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from xwlearn.detection.grounding_dino import (BiAttention, ContrastiveHead, GroundingDINO, GroundingText, HFBackbone, TextEnhancerLayer,
                                              convert_hf_mm_grounding_dino, convert_mmdet_mm_grounding_dino, grounding_set_loss, hf_backbone, language_guided_select,
                                              text_sine_embed, to_hf_mm_grounding_dino, token_focal_cost)
from xwlearn.vision.dino_detr import box_sine_embed, mask_sine_embed
from xwlearn.vision.layers import TinyBackbone

torch.set_num_threads(1)
FIX = Path(__file__).parent / "fixtures" / "mm_grounding_dino_hf_keys.json"
TINY = dict(d_model=32, n_heads=4, n_levels=4, n_points=2, n_enc=1, n_dec=2, d_ffn=64, n_queries=12, num_dn=6, max_text_len=32, gn_groups=8)


def prompt(n_phrases:int, toks:int=1, d_text:int=8, seed:int=0) -> GroundingText:
    "'[CLS] w . w . [SEP]' with `toks` words per phrase, no batch dim."
    g = torch.Generator().manual_seed(seed)
    T = 2 + n_phrases * (toks + 1)
    sam, pos, pm = torch.eye(T, dtype=torch.bool), torch.zeros(T, dtype=torch.long), torch.zeros(n_phrases, T, dtype=torch.bool)
    for p in range(n_phrases):
        s = 1 + p * (toks + 1)
        sam[s:s + toks, s:s + toks] = True; pos[s:s + toks] = torch.arange(toks); pm[p, s:s + toks] = True
    return GroundingText(mask=torch.ones(T, dtype=torch.bool), position_ids=pos, self_attn_mask=sam,
                         hidden=torch.randn(T, d_text, generator=g), phrase_map=pm, input_ids=torch.arange(T))


def tiny_model(**kw):
    torch.manual_seed(0)
    return GroundingDINO(TinyBackbone(widths=(8, 16, 32, 32), out_strides=(4, 8, 16)), d_text=8, **{**TINY, **kw})


def test_biattention_matches_two_softmaxes():
    torch.manual_seed(0)
    att = BiAttention(8, 8, 16, 2).double()
    v, l = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    l_pad = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool); v_pad = torch.zeros(2, 6, dtype=torch.bool); v_pad[1, 4:] = True
    dv, dl = att(v, l, v_pad, l_pad)
    for b in range(2):
        iv, il = [], []
        for h in range(2):
            sl = slice(8 * h, 8 * h + 8)
            A = att.vision_proj(v[b])[:, sl] @ att.text_proj(l[b])[:, sl].T / math.sqrt(8)            # (S, T), one head
            iv.append(A.masked_fill(l_pad[b][None], -math.inf).softmax(1) @ att.values_text_proj(l[b])[:, sl])
            il.append(A.T.masked_fill(v_pad[b][None], -math.inf).softmax(1) @ att.values_vision_proj(v[b])[:, sl])
        torch.testing.assert_close(dv[b], att.out_vision_proj(torch.cat(iv, 1)), rtol=0, atol=1e-12)
        torch.testing.assert_close(dl[b], att.out_text_proj(torch.cat(il, 1)), rtol=0, atol=1e-12)


def test_text_layer_keeps_phrases_apart_and_sine_is_mmdet():
    t = prompt(2, toks=2)
    layer = TextEnhancerLayer(16, 2, 32).double().eval()
    h = torch.randn(1, len(t.mask), 16, dtype=torch.float64)
    pos = text_sine_embed(t.position_ids[None], 16, dtype=torch.float64)
    h2 = h.clone(); h2[0, 4:6] += 1.
    torch.testing.assert_close(layer(h, pos, t.self_attn_mask[None])[0, :4], layer(h2, pos, t.self_attn_mask[None])[0, :4], rtol=0, atol=1e-12)
    p = torch.arange(5, dtype=torch.float64)[None]
    torch.testing.assert_close(text_sine_embed(p, 8, dtype=torch.float64), box_sine_embed(torch.stack([p, p], -1), 8)[..., :8], rtol=0, atol=1e-12)


def test_contrastive_head_and_token_cost():
    q, t = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    h = ContrastiveHead().double()
    s = h(q, t, m)
    assert torch.isinf(s[0, :, 2:]).all() and abs(h.bias.item() + math.log(99)) < 1e-6
    torch.testing.assert_close(s[1], q[1] @ t[1].T / math.sqrt(8) + h.bias, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="log_scale"): ContrastiveHead(log_scale="learn")
    lg, pm = torch.randn(5, 6, dtype=torch.float64), (torch.rand(2, 6) > 0.5).double()
    want = torch.stack([torch.stack([sigmoid_focal_loss(lg[i], pm[j], reduction="sum") for j in range(2)]) for i in range(5)])
    torch.testing.assert_close(token_focal_cost(lg, pm), want, rtol=0, atol=1e-9)
    ll = torch.randn(2, 9, 5); ll[0, :, 3:] = -math.inf
    sel = language_guided_select(ll, 4)
    assert torch.equal(sel, torch.stack([torch.tensor(sorted(range(9), key=lambda s: -max(ll[b, s].tolist()))[:4]) for b in range(2)]))


def test_set_loss_zero_for_perfect_predictions():
    pm = torch.tensor([[1., 1, 0, 0], [0, 0, 1, 0]])
    bx = torch.tensor([[.3, .3, .2, .2], [.6, .6, .3, .3]])
    lg = torch.full((1, 3, 4), -30.); lg[0, 0] = 60 * pm[1] - 30; lg[0, 2] = 60 * pm[0] - 30
    boxes = torch.full((1, 3, 4), .5); boxes[0, 0], boxes[0, 2] = bx[1], bx[0]
    assert grounding_set_loss(lg, boxes, torch.ones(1, 4, dtype=torch.bool), [dict(boxes=bx, positive_map=pm)]) < 1e-6


def _tiny_hf():
    from transformers import BertConfig, MMGroundingDinoConfig, MMGroundingDinoForObjectDetection, ResNetConfig
    bb = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    tx = BertConfig(vocab_size=1100, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    cfg = MMGroundingDinoConfig(backbone_config=bb, text_config=tx, d_model=32, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=64, decoder_ffn_dim=48,
                                encoder_attention_heads=4, decoder_attention_heads=4, num_queries=9, max_text_len=32, dropout=0., fusion_droppath=0.,
                                decoder_bbox_embed_share=False, decoder_cls_embed_share=False)
    torch.manual_seed(1)
    hf = MMGroundingDinoForObjectDetection(cfg).double().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "text_backbone" not in n and "conv_encoder" not in n: p.add_(torch.randn_like(p) * 0.1)
    return hf


def test_equal_to_hf_transformers_in_float64():
    pytest.importorskip("transformers")
    import transformers.models.mm_grounding_dino.modeling_mm_grounding_dino as hfm
    hf = _tiny_hf()
    ids = torch.tensor([[101, 5, 6, 1012, 7, 1012, 102, 0, 0], [101, 8, 1012, 9, 10, 11, 1012, 12, 102]])
    am = (torch.arange(9)[None] < torch.tensor([[7], [9]])).long()
    px = torch.randn(2, 3, 72, 56, dtype=torch.float64)
    pe = hf.model.backbone.position_embedding
    orig = hfm.encode_sinusoidal_position_embedding, pe.forward
    hfm.encode_sinusoidal_position_embedding = lambda p, num_pos_feats=128, temperature=10000: (
        text_sine_embed(p[..., 0], num_pos_feats, temperature, dtype=p.dtype) if p.shape[-1] == 1 else box_sine_embed(p, num_pos_feats, temperature))
    pe.forward = lambda pixel_values, pixel_mask: mask_sine_embed(~pixel_mask.bool(), 16, 20., dtype=pixel_values.dtype)
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad(): ref = hf(pixel_values=px, input_ids=ids, attention_mask=am)
    finally:
        torch.set_default_dtype(torch.float32); hfm.encode_sinusoidal_position_embedding, pe.forward = orig
    sam, pid = hfm.generate_masks_with_special_tokens_and_transfer_map(ids, hf.model.special_tokens)
    with torch.no_grad(): hidden = hf.model.text_backbone(ids, sam[:, None], torch.zeros_like(ids), pid).last_hidden_state
    ours = GroundingDINO(HFBackbone(copy.deepcopy(hf.model.backbone.conv_encoder.model)), d_text=24, d_model=32, n_heads=4, n_enc=2, n_dec=3,
                         d_ffn=64, d_ffn_dec=48, n_queries=9, max_text_len=32, neck_bias=True).double().eval()
    res = ours.load_state_dict(convert_hf_mm_grounding_dino(hf.state_dict()), strict=False)
    assert (res.missing_keys, res.unexpected_keys) == (["label_embedding.weight"], [])
    with torch.no_grad():
        o = ours.forward_outputs(px, torch.zeros(2, 72, 56, dtype=torch.bool), dict(mask=am.bool(), position_ids=pid, self_attn_mask=sam, hidden=hidden))
    valid = am.bool()[:, None].expand(-1, 9, -1)
    torch.testing.assert_close(o["logits"][-1][valid], ref.logits[..., :9][valid], rtol=0, atol=1e-11)
    assert torch.isinf(o["logits"][-1][~valid]).all()
    torch.testing.assert_close(o["boxes"][-1], ref.pred_boxes, rtol=0, atol=1e-12)
    torch.testing.assert_close(o["enc_boxes"], ref.init_reference_points, rtol=0, atol=1e-12)
    bert = {k[len("text_backbone."):]: v for k, v in convert_hf_mm_grounding_dino(hf.state_dict(), keep_text_backbone=True).items() if k.startswith("text_backbone.")}
    back, hsd = to_hf_mm_grounding_dino(ours.state_dict(), bert), hf.state_dict()
    assert sorted(back) == sorted(hsd) and all(torch.equal(back[k], hsd[k]) for k in hsd)


def test_manifest_of_released_layout():
    pytest.importorskip("transformers")
    from transformers import SwinConfig
    man = json.loads(FIX.read_text())
    sd = {k: torch.empty(s, device="meta") for k, s in man["keys"].items()}
    conv = convert_hf_mm_grounding_dino(sd)
    with torch.device("meta"): m = GroundingDINO(hf_backbone(SwinConfig(out_indices=[2, 3, 4])), d_text=man["config"]["text_hidden"], neck_bias=True)
    msd = m.state_dict()
    assert set(msd) - set(conv) == {"label_embedding.weight"} and set(conv) <= set(msd)
    assert [k for k in conv if conv[k].shape != msd[k].shape] == []
    assert len(man["keys"]) == 1059 and any(k.startswith("model.text_backbone.") for k in man["keys"])
    with pytest.raises(ValueError, match="unknown key"): convert_hf_mm_grounding_dino({**sd, "model.extra.weight": torch.zeros(1)})
    # mmdet's own layout (manifest written from the mmdet code): all but the Swin backbone and the BERT convert, to the same keys
    mm = json.loads((FIX.parent / "mm_grounding_dino_mmdet_keys.json").read_text())["keys"]
    cm, rest = convert_mmdet_mm_grounding_dino({"state_dict": {k: torch.empty(s, device="meta") for k, s in mm.items()}})
    assert set(cm) == {k for k in msd if not k.startswith("backbone.")} and [k for k in cm if cm[k].shape != msd[k].shape] == []
    assert {k.split(".")[0] for k in rest} == {"backbone", "language_model"} and len(mm) == 908
    with pytest.raises(ValueError, match="unknown key"): convert_mmdet_mm_grounding_dino({"encoder.extra.weight": torch.zeros(1)})


def test_train_step_eval_and_padding():
    m = tiny_model()
    ims = [torch.rand(3, 64, 64), torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8)]
    tg = [dict(boxes=torch.tensor([[4., 4, 30, 30], [20, 30, 60, 60]]), labels=torch.tensor([0, 2]), text=prompt(3)),
          dict(boxes=torch.tensor([[10., 5, 40, 40]]), labels=torch.tensor([1]), text=prompt(2, toks=2, seed=1))]
    m.train()
    losses = m(ims, tg)
    assert tuple(losses) == m.loss_terms and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []
    m.eval()
    with torch.no_grad(): d = m(ims, tg)
    assert [len(x["boxes"]) for x in d] == [36, 36] and d[1]["labels"].max() <= 2
    assert d[1]["boxes"][:, 3].max() <= 48
    # a prompt's logits do not depend on the padding added for a longer prompt in the same batch
    x, mask, _ = m.batch_images(ims[:1])
    one = m.forward_outputs(x, mask, GroundingText.collate([tg[1]["text"]]))["logits"]
    two = m.forward_outputs(torch.cat([x, x]), torch.cat([mask, mask]), GroundingText.collate([tg[1]["text"], prompt(5)]))["logits"]
    T = len(tg[1]["text"].mask)
    torch.testing.assert_close(two[:, 0, :, :T], one[:, 0], rtol=1e-5, atol=1e-5)


def test_shared_heads_and_errors():
    m = tiny_model(share_heads=True)
    assert m.reg_branches[0] is m.reg_branches[1] and m.reg_branches[2] is not m.reg_branches[0]
    u = tiny_model()
    assert sum(p.numel() for p in u.parameters()) - sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in u.reg_branches[1].parameters()) + 1
    t = prompt(2)
    with pytest.raises(ValueError, match="text.self_attn_mask"):
        GroundingText(mask=t.mask[None], position_ids=t.position_ids[None], self_attn_mask=t.self_attn_mask).check()
    with pytest.raises(ValueError, match="one per image"): GroundingText.collate([t]).check(2)
    with pytest.raises(TypeError, match="images"): m(torch.rand(1, 3, 32, 32))
    m.eval()
    with pytest.raises(ValueError, match="no prompt"): m([torch.rand(3, 32, 32)])
    nohidden = GroundingText.collate([GroundingText(t.mask, t.position_ids, t.self_attn_mask, phrase_map=t.phrase_map)])
    with pytest.raises(ValueError, match="text.hidden"): m([torch.rand(3, 32, 32)], text=nohidden)


class _Words(torch.nn.Module):
    "The `xwlearn.vl.text` encoder contract: forward(input_ids, self_attn_mask=, position_ids=) → (B, T, dim)."
    def __init__(self, n=32, dim=8): super().__init__(); self.emb, self.dim = torch.nn.Embedding(n, dim), dim
    def forward(self, input_ids, self_attn_mask=None, position_ids=None, token_type_ids=None): return self.emb(input_ids)


def test_text_encoder_and_vl_text_dicts():
    m = tiny_model(text_encoder=_Words()).eval()
    t = prompt(3)
    d = dict(mask=t.mask[None], position_ids=t.position_ids[None], self_attn_mask=t.self_attn_mask[None], input_ids=t.input_ids[None],
             token_type_ids=torch.zeros(1, len(t.mask), dtype=torch.long), positive_maps=[F.pad(t.phrase_map.float(), (0, 20))])
    with torch.no_grad(): dets = m([torch.rand(3, 32, 32)], text=d)
    assert dets[0]["labels"].max() <= 2 and len(dets[0]["scores"]) == 12 * 3
    with pytest.raises(ValueError, match="text.input_ids"):
        m([torch.rand(3, 32, 32)], text={k: v for k, v in d.items() if k != "input_ids"})
    with pytest.raises(ValueError, match="beyond"):
        GroundingText.of({**d, "positive_maps": [F.pad(t.phrase_map.float(), (0, 20), value=1.)]})
