"Tests of xwlearn.vl.text: the sub-sentence mask against mmdet's loop, positive maps against the char_to_token rule, the tiny encoder's phrase and padding invariances (float64), error messages."
import pytest
import torch
from hypothesis import given, settings, strategies as st
from xwlearn.vl.text import (MAX_TEXT_LEN, TinyTextEncoder, WordTokenizer, caption_from_phrases, encode_text, load_bert,
                             load_hf_text_encoder, minilm_path, positive_map, prepare_text, special_token_ids,
                             sub_sentence_mask, tokenize)

torch.set_num_threads(1)
WORDS = ['red', 'blue', 'green', 'circle', 'square', 'ring', 'striped', 'small', 'cat', 'teddy', 'bear']
TOK = WordTokenizer(WORDS)

def loop_reference(input_ids, special_ids):
    "mmdet's `generate_masks_with_special_tokens_and_transfer_map`, as a loop over the special tokens."
    B, T = input_ids.shape
    mask = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1); pos = torch.zeros(B, T, dtype=torch.long); prev = 0
    for row, col in torch.nonzero(torch.isin(input_ids, special_ids)).tolist():
        if col in (0, T - 1): mask[row, col, col] = True; pos[row, col] = 0
        else:
            mask[row, prev + 1:col + 1, prev + 1:col + 1] = True; pos[row, prev + 1:col + 1] = torch.arange(col - prev)
        prev = col
    return mask, pos

@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([4, 5, 7, 8, 9, 10]), min_size=0, max_size=14), min_size=1, max_size=4),
       st.booleans())
def test_sub_sentence_mask_equals_loop(rows, pad_to_max):
    T = max(len(r) for r in rows) + 2 + (3 if pad_to_max else 0)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows): ids[b, :len(r) + 2] = torch.tensor([2, *r, 3])   # [CLS] ... [SEP] [PAD]...
    sp = special_token_ids(TOK)
    for ours, ref in zip(sub_sentence_mask(ids, sp), loop_reference(ids, sp)): assert torch.equal(ours, ref)

def char_to_token_rule(offsets, tokens_positive, T):
    "mmdet's `create_positive_map`: fill from the token of the first character to the token of the last one."
    def c2t(c): return next(t for t, (s, e) in enumerate(offsets.tolist()) if s <= c < e)
    pm = torch.zeros(len(tokens_positive), T)
    for k, sp in enumerate(tokens_positive):
        for s, e in sp: pm[k, c2t(s):c2t(e - 1) + 1] = 1
    return pm

@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(' '.join), min_size=1, max_size=6),
       st.sampled_from([' . ', '. ']))
def test_positive_map_equals_char_to_token_rule(phrases, sep):
    cap, spans = caption_from_phrases(phrases, sep)
    off = tokenize(TOK, [cap])['offset_mapping'][0]
    pm = positive_map(off, spans)
    assert torch.equal(pm, char_to_token_rule(off, spans, len(off)))
    assert torch.equal(pm.sum(1), torch.tensor([len(p.split()) for p in phrases], dtype=torch.float))
    assert torch.allclose(positive_map(off, spans, width=MAX_TEXT_LEN, normalize=True).sum(1), torch.ones(len(phrases)))

def test_tiny_encoder_phrase_and_padding_invariance():
    torch.manual_seed(0)
    enc = TinyTextEncoder(TOK.vocab_size, dim=16, layers=2, heads=2).double().eval()
    caps = ['red circle . blue square . ', 'cat . red circle . ', 'teddy bear . small green ring striped . cat . ']
    with torch.no_grad():
        batch = encode_text(enc, prepare_text(TOK, caps))['hidden']
        for b, c in enumerate(caps):                      # each caption alone (no padding) = its row of the padded batch
            alone = encode_text(enc, prepare_text(TOK, [c]))['hidden'][0]
            torch.testing.assert_close(batch[b, :len(alone)], alone, rtol=0, atol=1e-12)
        # 'red circle .' has the same features whichever phrase precedes it
        torch.testing.assert_close(batch[0, 1:4], batch[1, 3:6], rtol=0, atol=1e-12)
    enc.float().train()
    out = encode_text(enc, prepare_text(TOK, caps))
    out['hidden'][out['mask']].pow(2).sum().backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if not n.startswith('token_type'))

def test_prepare_text_truncation_and_positive_maps():
    phrases = [f'{c} {s}' for c in ('red', 'blue', 'green') for s in ('circle', 'square', 'ring')]
    cap, spans = caption_from_phrases(phrases)
    t = prepare_text(TOK, [cap], [spans], max_length=12, width=MAX_TEXT_LEN)
    assert t['input_ids'].shape == (1, 12) and t['input_ids'][0, -1] == 3
    kept = t['positive_maps'][0].sum(1)
    assert kept.tolist() == [2, 2, 2, 1, 0, 0, 0, 0, 0]   # 10 tokens fit: 3 phrases + 'blue' of the fourth
    assert t['positive_maps'][0].shape == (9, MAX_TEXT_LEN)
    plain = prepare_text(TOK, [cap], sub_sentence=False)
    assert plain['self_attn_mask'].all() and torch.equal(plain['position_ids'][0], torch.arange(plain['input_ids'].shape[1]))

def test_errors_name_the_argument(tmp_path):
    with pytest.raises(TypeError, match='phrases'): caption_from_phrases('red circle')
    with pytest.raises(ValueError, match='phrases'): caption_from_phrases(['red', ' '])
    with pytest.raises(TypeError, match='captions'): tokenize(TOK, 'red circle .')
    with pytest.raises(ValueError, match='max_length'): tokenize(TOK, ['red'], max_length=600)
    with pytest.raises(ValueError, match='input_ids'): sub_sentence_mask(torch.zeros(3, dtype=torch.long), special_token_ids(TOK))
    with pytest.raises(ValueError, match='width'): positive_map(torch.zeros(5, 2, dtype=torch.long), [[[0, 1]]], width=3)
    with pytest.raises(ValueError, match=r'tokens_positive\[1\]'): positive_map(torch.zeros(5, 2, dtype=torch.long), [[[0, 1]], []])
    with pytest.raises(ValueError, match='tokens_positive'): prepare_text(TOK, ['red .'], [[[[0, 3]]], [[[0, 3]]]])
    (tmp_path / 'config.json').write_text('{}')
    with pytest.raises(FileNotFoundError, match=r'model\.safetensors.*tokenizer\.json'): load_hf_text_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match='huggingface-cli download google-bert/bert-base-uncased'): load_bert(tmp_path / 'bert')

def test_minilm_is_shipped_offline():
    p = minilm_path()
    assert (p / 'config.json').is_file() and (p / 'model.safetensors').is_file() and (p / 'tokenizer.json').is_file()
