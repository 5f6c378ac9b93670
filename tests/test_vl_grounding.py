"Tests of xwlearn.vl.grounding: the base/novel split, prompts with sampled negatives (budget, frequencies), targets read back through positive maps, and the validating ODVG / MDETR readers on the substrate's fixture and on faulty files."
import json, warnings
from collections import Counter
import numpy as np
import pytest
import torch
from xwlearn.vision.datasets import objects365_goldg_fixture
from xwlearn.vision.scenes import object_phrase
from xwlearn.vl.grounding import (grounding_scenes, grounding_target, read_mdetr, read_odvg, record_target, sample_prompt,
                                  shape_categories)
from xwlearn.vl.text import WordTokenizer, prepare_text

torch.set_num_threads(1)
NAMES, NOVEL = shape_categories()
TOK = WordTokenizer()

def phrase_words(t):
    "The words each box's phrase lights up in the positive map of its caption."
    txt = prepare_text(TOK, [t['caption']], [t['tokens_positive']])
    ids, pm = txt['input_ids'][0], txt['positive_maps'][0]
    return [' '.join(TOK.vocab[i] for i in ids[pm[p] > 0]) for p in t['phrase_ids']]

def test_split_and_targets():
    base, novel = grounding_scenes(48, seed=3, split='base'), grounding_scenes(48, seed=3, split='novel')
    assert len(base) + len(novel) == 48 and len(novel) > 0
    rng = np.random.default_rng(0)
    for gs, has_novel in ((base, False), (novel, True)):
        for k in range(len(gs)):
            cats = gs.category[gs.objects(k)]
            assert gs.novel[cats].any() == has_novel
            t = grounding_target(gs, k, rng, candidates=np.flatnonzero(~NOVEL)) if not has_novel else grounding_target(gs, k)
            assert phrase_words(t) == [object_phrase(gs.scenes, j, texture=False) for j in gs.objects(k)]
            if not has_novel: assert not NOVEL[t['phrases']].any()
            assert t['boxes'].shape == (len(cats), 4) and (t['boxes'][:, 2:] > t['boxes'][:, :2]).all()

@pytest.mark.parametrize('max_tokens', [20, 40, 256])
def test_prompt_budget_and_membership(max_tokens):
    rng = np.random.default_rng(max_tokens)
    for _ in range(50):
        pos = rng.choice(40, size=int(rng.integers(1, 4)), replace=False).tolist()
        cand = rng.choice(40, size=20, replace=False)
        p = sample_prompt(pos, NAMES, rng, candidates=cand, max_tokens=max_tokens)
        assert set(pos) <= set(p['phrases']) and len(set(p['phrases'])) == len(p['phrases'])
        assert set(p['phrases']) - set(pos) <= set(cand.tolist())
        assert prepare_text(TOK, [p['caption']], max_length=512)['input_ids'].shape[1] <= max_tokens

def test_negative_count_distribution():
    # mmdet's RandomSamplingNegPos: P(maximum) = p_full + (1 - p_full)/N; otherwise uniform in 1..N (N = 10 here)
    rng = np.random.default_rng(0); cand = np.arange(10, 20)
    n = np.array([len(sample_prompt([0], NAMES, rng, max_negatives=10, candidates=cand, full_sampling_prob=0.3)['phrases']) - 1
                  for _ in range(3000)])
    p_max = 0.3 + 0.7 / 10
    assert abs((n == 10).mean() - p_max) < 4 * np.sqrt(p_max * (1 - p_max) / 3000)
    assert abs((n == 1).mean() - 0.07) < 4 * np.sqrt(0.07 * 0.93 / 3000)

def test_errors_name_the_argument():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match='split'): grounding_scenes(2, split='val')
    with pytest.raises(ValueError, match='positive'): sample_prompt([-1], NAMES, rng)
    with pytest.raises(ValueError, match='positive'): sample_prompt(list(range(40)), NAMES, rng, max_tokens=20)
    with pytest.raises(ValueError, match='full_sampling_prob'): sample_prompt([0], NAMES, rng, full_sampling_prob=2)
    gs = grounding_scenes(16, seed=1, split='novel')
    with pytest.raises(ValueError, match='prompt'): grounding_target(gs, 0, prompt=np.flatnonzero(~NOVEL).tolist())

@pytest.fixture(scope='module')
def fixture_root(tmp_path_factory): return objects365_goldg_fixture(tmp_path_factory.mktemp('o365'), n=4)

def test_readers_round_trip_fixture(fixture_root):
    r = fixture_root
    od = read_odvg(r / 'objects365v1/o365v1_train_odvg.jsonl')
    coco = json.loads((r / 'objects365v1/objects365_train.json').read_text())
    assert od.kind == 'detection' and not od.dropped
    boxes = sorted(tuple(b) for rec in od.records for b in rec['boxes'].tolist())
    assert boxes == sorted((x, y, x + w, y + h) for x, y, w, h in (a['bbox'] for a in coco['annotations']))
    for d, j in (('flickr30k_entities', 'final_flickr_separateGT_train.json'), ('gqa', 'final_mixed_train_no_coco.json')):
        g = read_mdetr(r / d / j); js = json.loads((r / d / j).read_text())
        assert g.kind == 'grounding' and not g.dropped and sum(len(x['boxes']) for x in g.records) == len(js['annotations'])
        for rec in g.records:
            if len(rec['boxes']): assert phrase_words(record_target(g, rec)) == [p.lower() for p in rec['phrases']]
    rec = next(x for x in od.records if len(x['boxes']))
    assert phrase_words(record_target(od, rec, np.random.default_rng(0))) == [od.label_map[int(l)] for l in rec['labels']]

def test_readers_drop_faulty_boxes_and_say_so(tmp_path):
    js = dict(images=[dict(id=1, file_name='a.jpg', height=32, width=32, caption='a red circle and a blue square.')],
              annotations=[dict(id=1, image_id=1, bbox=[1, 1, 10, 10], tokens_positive=[[2, 12]]),
                           dict(id=2, image_id=1, bbox=[2, 2, 8, 8], tokens_positive=[[2, 12]]),       # same phrase
                           dict(id=3, image_id=1, bbox=[1, 1, 5, 5], tokens_positive=[[20, 99]]),      # span past the caption
                           dict(id=4, image_id=7, bbox=[1, 1, 5, 5], tokens_positive=[[2, 12]]),       # unknown image
                           dict(id=5, image_id=1, bbox=[1, 1, 0, 5], tokens_positive=[[19, 30]]),      # zero width
                           dict(id=6, image_id=1, bbox=[1, 1, float('nan'), 5], tokens_positive=[[19, 30]])])
    (tmp_path / 'm.json').write_text(json.dumps(js))
    with pytest.warns(UserWarning, match='dropped'): g = read_mdetr(tmp_path / 'm.json')
    assert g.dropped == Counter({'boxes whose tokens_positive are missing or outside the caption': 1, 'boxes of unknown images': 1,
                                 'empty boxes (after clipping to the image)': 1, 'boxes not 4 finite numbers': 1})
    t = record_target(g, g.records[0])
    assert t['phrase_ids'].tolist() == [0, 0] and t['phrases'] == ['red circle']
    line = dict(filename='b.jpg', height=20, width=30, grounding=dict(caption='Two rings', regions=[
        dict(bbox=[0, 0, 10, 10], phrase='rings', tokens_positive=[[4, 9]]), dict(bbox=[0, 0, 10, 10], phrase='x', tokens_positive=[[4, 19]])]))
    (tmp_path / 'g.jsonl').write_text(json.dumps(line) + '\n')
    with pytest.warns(UserWarning, match='tokens_positive'): g2 = read_odvg(tmp_path / 'g.jsonl')
    assert g2.kind == 'grounding' and len(g2.records[0]['boxes']) == 1
    assert record_target(g2, g2.records[0])['caption'] == 'two rings. '
    for text, match in (('{"filename": "a.jpg", "height": 4}', 'width'), ('not json', 'line 1'),
                        ('{"filename": "a.jpg", "height": 4, "width": 4}', "'detection' or 'grounding'")):
        (tmp_path / 'bad.jsonl').write_text(text + '\n')
        with pytest.raises(ValueError, match=match): read_odvg(tmp_path / 'bad.jsonl', {'0': 'a'})
    det = dict(filename='c.jpg', height=8, width=8, detection=dict(instances=[]))
    (tmp_path / 'mixed.jsonl').write_text(json.dumps(det) + '\n' + json.dumps(line) + '\n')
    with pytest.raises(ValueError, match='line 2'): read_odvg(tmp_path / 'mixed.jsonl', {'0': 'a'})
    (tmp_path / 'sub').mkdir(); (tmp_path / 'sub/d.jsonl').write_text(json.dumps(det) + '\n')
    with pytest.raises(FileNotFoundError, match='label_map'): read_odvg(tmp_path / 'sub/d.jsonl')
    with pytest.raises(FileNotFoundError, match='path'): read_mdetr(tmp_path / 'none.json')

def test_ap_by_split_base_and_novel():
    from xwlearn.vl.grounding import ap_by_split
    ev = grounding_scenes(30, seed=7, split='all')
    objs = [ev.objects(k) for k in range(len(ev))]
    det = lambda k, shift=0.0, keep=None: dict(boxes=ev.scenes.objects['box'][objs[k]] + shift, scores=np.linspace(1, 0.5, len(objs[k])),
                                               labels=ev.category[objs[k]])
    r = ap_by_split(ev, [det(k) for k in range(len(ev))])
    assert r['AP_base'] == pytest.approx(1.0) and r['AP_novel'] == pytest.approx(1.0)
    far = ap_by_split(ev, [det(k, shift=40.0) for k in range(len(ev))])          # every box misses: AP 0
    assert far['AP_base'] == 0 and far['AP_novel'] == 0
    empty = [dict(boxes=np.zeros((0, 4)), scores=np.zeros(0), labels=np.zeros(0, int)) for _ in range(len(ev))]
    assert ap_by_split(ev, empty)['AP_novel'] == 0
