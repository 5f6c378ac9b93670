"""Formats (`xwlearn.vision.formats`): every reader on its writer's output (round trip of every label) and on a small
sample written here by hand in the official layout; partial layouts raise errors that name what is missing."""
import json, os, pickle
import numpy as np
import pytest, torch
from PIL import Image
from pycocotools import mask as mask_utils
from xwlearn.data import DatasetLayoutError
from xwlearn.vision.scenes import make_scenes, make_clips, make_homography_pairs, referring_expressions, captions
from xwlearn.vision.formats import (mask_to_rle, decode_segmentation, write_coco_instances, read_coco_instances, write_coco_semi_splits,
                                    read_coco_semi_split, write_coco_captions, read_coco_captions, write_refcoco, read_refcoco,
                                    load_pickle_restricted, write_label_png, read_label_png, voc_palette, write_cocovid, read_cocovid,
                                    write_hpatches, read_hpatches_sequence)

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def sc():
    return make_scenes(12, seed=2, p_crowd=0.25, p_empty=0.15, max_objects=5)


# --- hand-written samples in the official layouts ----------------------------------------------------------------
COCO_SAMPLE = """{
 "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
 "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "Attribution-NonCommercial-ShareAlike License"}],
 "images": [{"license": 1, "file_name": "000000000139.jpg", "coco_url": "", "height": 20, "width": 30, "date_captured": "2013-11-21 01:34:01", "flickr_url": "", "id": 139},
            {"license": 1, "file_name": "000000000285.jpg", "coco_url": "", "height": 20, "width": 30, "date_captured": "2013-11-18 09:29:06", "flickr_url": "", "id": 285}],
 "annotations": [
  {"segmentation": [[2.0, 2.0, 12.0, 2.0, 12.0, 10.0, 2.0, 10.0]], "area": 80.0, "iscrowd": 0, "image_id": 139, "bbox": [2.0, 2.0, 10.0, 8.0], "category_id": 18, "id": 1768},
  {"segmentation": {"counts": [42, 3, 17, 3, 17, 3, 515], "size": [20, 30]}, "area": 9, "iscrowd": 1, "image_id": 139, "bbox": [2.0, 2.0, 3.0, 3.0], "category_id": 1, "id": 900100139},
  {"segmentation": [[20.5, 5.5, 28.0, 5.5, 24.0, 15.0]], "area": 35.6, "iscrowd": 0, "image_id": 285, "bbox": [20.5, 5.5, 7.5, 9.5], "category_id": 90, "id": 2001}],
 "categories": [{"supercategory": "person", "id": 1, "name": "person"}, {"supercategory": "animal", "id": 18, "name": "dog"},
                {"supercategory": "indoor", "id": 90, "name": "toothbrush"}]
}"""


def test_rle_matches_pycocotools():
    rng = np.random.default_rng(1)
    for t in range(60):
        h, w = (int(v) for v in rng.integers(1, 25, 2)); m = rng.random((h, w)) < rng.random()
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert mask_to_rle(m, compress=True)['counts'] == ref['counts'].decode()
        assert (decode_segmentation(mask_to_rle(m), h, w) == m).all()
        assert (decode_segmentation(dict(size=[h, w], counts=ref['counts'].decode()), h, w) == m).all()


def test_coco_official_sample(tmp_path):
    (tmp_path/'instances_val2017.json').write_text(COCO_SAMPLE)
    r = read_coco_instances(tmp_path/'instances_val2017.json', masks=True)
    assert set(r['categories']) == {1, 18, 90} and set(r['images']) == {139, 285}
    a = r['annotations'][139]
    np.testing.assert_array_equal(a['category_id'], [18, 1]); np.testing.assert_array_equal(a['iscrowd'], [False, True])
    np.testing.assert_array_equal(a['boxes'][0], [2, 2, 12, 10]); assert np.isnan(a['points']).all()   # no 'point' key in COCO
    js = json.loads(COCO_SAMPLE)
    crowd = mask_utils.decode(mask_utils.frPyObjects(js['annotations'][1]['segmentation'], 20, 30))
    np.testing.assert_array_equal(a['masks'][1], crowd.astype(bool)); assert a['masks'][1].sum() == 9
    ys, xs = np.nonzero(a['masks'][0]); assert (xs.min(), ys.min()) == (2, 2) and abs(a['masks'][0].sum() - 80) <= 20   # polygon, rasterised
    for drop, msg in (('categories', "no ['categories'] list"),):
        bad = {k: v for k, v in js.items() if k != drop}
        with pytest.raises(DatasetLayoutError, match=msg.replace('[', r'\[').replace(']', r'\]')): read_coco_instances(bad)
    bad = dict(js, annotations=[dict(js['annotations'][0], image_id=7)])
    with pytest.raises(DatasetLayoutError, match='image 7, which is not in'): read_coco_instances(bad)
    with pytest.raises(DatasetLayoutError, match='is missing'): read_coco_instances(tmp_path/'instances_train2017.json')


def test_coco_round_trip_and_detection_loader(tmp_path, sc):
    from xwlearn.vision.detection import coco_dataset
    cids = (2, 5, 11, 40, 90)
    write_coco_instances(sc, tmp_path/'annotations/instances_val2017.json', tmp_path/'val2017', category_ids=cids)
    r = read_coco_instances(tmp_path/'annotations/instances_val2017.json', masks=True)
    for i in range(len(sc)):
        t, a = sc.target(i), r['annotations'][i + 1]
        np.testing.assert_array_equal(a['boxes'], t['boxes']); np.testing.assert_array_equal(a['masks'], t['masks'])
        np.testing.assert_array_equal(a['category_id'], np.array(cids)[t['labels'] - 1]); np.testing.assert_array_equal(a['iscrowd'], t['crowd'])
        np.testing.assert_array_equal(a['area'], t['area']); np.testing.assert_array_equal(a['points'], t['points'][:, 0])
    ds = coco_dataset(tmp_path, 'val2017')                      # the detection substrate's loader reads our files
    assert len(ds) == len(sc) and ds.report['crowd'] == int(sc.objects['crowd'][sc.objects['area'] > 0].sum())
    for i in range(len(sc)):
        t = sc.target(i); _, y = ds[i]
        np.testing.assert_allclose(y['boxes'].numpy(), t['boxes'][~t['crowd']])
        l2c = getattr(ds, 'label_to_cat', None)                  # contiguous labels if the loader maps them
        got = [l2c[int(l)] if l2c is not None else int(l) for l in y['labels']]
        assert got == np.array(cids)[t['labels'][~t['crowd']] - 1].tolist()
    import inspect
    if 'masks' in inspect.signature(coco_dataset).parameters:   # the loader's own mask decoding reads our RLE
        dm = coco_dataset(tmp_path, 'val2017', masks=True)
        for i in range(len(sc)):
            t = sc.target(i); np.testing.assert_array_equal(dm[i][1]['masks'].numpy().astype(bool), t['masks'][~t['crowd']])
    with pytest.raises(ValueError, match='category_ids'): write_coco_instances(sc, tmp_path/'x.json', category_ids=(1, 1, 2, 3, 4))


def test_semi_splits(tmp_path, sc):
    write_coco_instances(sc, tmp_path/'instances_train2017.json')
    write_coco_semi_splits(tmp_path/'instances_train2017.json', tmp_path/'semi_supervised', percents=(10, 50), folds=(1, 2))
    for f in (1, 2):
        lab, unl = read_coco_semi_split(tmp_path/'semi_supervised', f, 50, full=tmp_path/'instances_train2017.json')
        assert len(lab['images']) == 6 and not set(lab['images']) & set(unl['images'])
    assert set(read_coco_semi_split(tmp_path/'semi_supervised', 1, 50)[0]['images']) != set(read_coco_semi_split(tmp_path/'semi_supervised', 2, 50)[0]['images'])
    # hand-written: the official names, one labelled image, one unlabelled
    js = json.loads(COCO_SAMPLE); d = tmp_path/'hand'; d.mkdir()
    (d/'instances_train2017.1@1.json').write_text(json.dumps(dict(js, images=js['images'][:1], annotations=js['annotations'][:2])))
    (d/'instances_train2017.1@1-unlabeled.json').write_text(json.dumps(dict(js, images=js['images'][1:], annotations=js['annotations'][2:])))
    lab, unl = read_coco_semi_split(d, 1, 1); assert list(lab['images']) == [139] and list(unl['images']) == [285]
    os.remove(d/'instances_train2017.1@1-unlabeled.json')
    with pytest.raises(DatasetLayoutError, match=r"instances_train2017.1@1-unlabeled.json'\] are missing"): read_coco_semi_split(d, 1, 1)


def test_captions(tmp_path, sc):
    write_coco_captions(sc, tmp_path/'captions_train2017.json')
    got = read_coco_captions(tmp_path/'captions_train2017.json')
    assert [got[i + 1] for i in range(len(sc))] == [captions(sc, i) for i in range(len(sc))]
    (tmp_path/'captions_val2017.json').write_text("""{"info": {"description": "COCO 2017 Dataset"}, "licenses": [],
      "images": [{"license": 4, "file_name": "000000397133.jpg", "height": 427, "width": 640, "id": 397133}],
      "annotations": [{"image_id": 397133, "id": 370509, "caption": "A man is in a kitchen making pizzas."},
                      {"image_id": 397133, "id": 375622, "caption": "Man in apron standing on front of oven with pans and bakeware"}]}""")
    assert read_coco_captions(tmp_path/'captions_val2017.json') == {397133: ["A man is in a kitchen making pizzas.",
                                                                           "Man in apron standing on front of oven with pans and bakeware"]}
    (tmp_path/'bad.json').write_text('{"images": [], "annotations": [{"image_id": 1, "id": 2}]}')
    with pytest.raises(DatasetLayoutError, match=r"lacks \['caption'\]"): read_coco_captions(tmp_path/'bad.json')


def test_refcoco(tmp_path, sc):
    d = write_refcoco(sc, tmp_path/'refer', 'refcocog', 'umd')
    r = read_refcoco(d, 'umd'); n = sum(len(referring_expressions(sc, i)) for i in range(len(sc)))
    assert len(r['refs']) == n > 0
    for ref in r['refs']:
        a = r['instances']['annotations'][ref['image_id']]; k = list(a['ann_id']).index(ref['ann_id'])
        ex = [e for e in referring_expressions(sc, ref['image_id'] - 1) if e['sentence'] == ref['sentences'][0]['sent']][0]
        np.testing.assert_array_equal(a['boxes'][k], sc.objects['box'][ex['object']])
    # hand-written, as in refcoco/refs(unc).p and instances.json
    h = tmp_path/'hand'/'refcoco'; h.mkdir(parents=True)
    refs = [{'sent_ids': [0, 1], 'file_name': 'COCO_train2014_000000000139_1768.jpg', 'ann_id': 1768, 'ref_id': 0, 'image_id': 139,
             'split': 'testA', 'sentences': [{'tokens': ['dog', 'on', 'the', 'left'], 'raw': 'Dog on the left', 'sent_id': 0, 'sent': 'dog on the left'},
                                             {'tokens': ['left', 'dog'], 'raw': 'left dog', 'sent_id': 1, 'sent': 'left dog'}], 'category_id': 18}]
    (h/'refs(unc).p').write_bytes(pickle.dumps(refs, protocol=2)); (h/'instances.json').write_text(COCO_SAMPLE)
    r = read_refcoco(h); assert r['refs'] == refs and r['by_split'] == {'testA': 1}
    (h/'refs(unc).p').write_bytes(pickle.dumps([dict(refs[0], ann_id=5)], protocol=2))
    with pytest.raises(DatasetLayoutError, match='has no such annotation'): read_refcoco(h)
    (h/'refs(unc).p').write_bytes(pickle.dumps([{k: v for k, v in refs[0].items() if k != 'split'}], protocol=2))
    with pytest.raises(DatasetLayoutError, match=r"lacks \['split'\]"): read_refcoco(h)
    with pytest.raises(DatasetLayoutError, match=r'refs\(google\).p is missing'): read_refcoco(h, 'google')


class _Evil:
    def __reduce__(self): return (os.system, ('echo unpickled',))


def test_restricted_unpickler(tmp_path):
    (tmp_path/'ok.p').write_bytes(pickle.dumps({'a': [1, 2.5, 'x', (3, 4)], 'b': {5, 6}}, protocol=2))
    assert load_pickle_restricted(tmp_path/'ok.p') == {'a': [1, 2.5, 'x', (3, 4)], 'b': {5, 6}}
    for obj in ([_Evil()], np.zeros(2), [torch.zeros(1)]):
        (tmp_path/'bad.p').write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(pickle.UnpicklingError, match='is not allowed'): load_pickle_restricted(tmp_path/'bad.p')


def test_label_pngs(tmp_path, sc):
    for i in range(3):
        write_label_png(tmp_path/f'{i}.png', sc.semantic[i]); np.testing.assert_array_equal(read_label_png(tmp_path/f'{i}.png', 'P'), sc.semantic[i])
    # hand-made like VOC's SegmentationClass: palette image with the official colours, 255 on the border
    lab = np.zeros((6, 8), np.uint8); lab[1:5, 1:4] = 15; lab[1:5, 4] = 255; lab[2:4, 5:7] = 1
    im = Image.fromarray(lab, 'P'); im.putpalette([0, 0, 0, 128, 0, 0] + [0] * 3 * 13 + [192, 128, 128] + [0] * 3 * 239 + [224, 224, 192])
    im.save(tmp_path/'2007_000032.png'); np.testing.assert_array_equal(read_label_png(tmp_path/'2007_000032.png', 'P'), lab)
    np.testing.assert_array_equal(voc_palette()[[0, 1, 15, 255]], np.array(im.getpalette()).reshape(-1, 3)[[0, 1, 15, 255]])
    Image.fromarray(lab, 'L').save(tmp_path/'ADE_val_00000001.png')
    np.testing.assert_array_equal(read_label_png(tmp_path/'ADE_val_00000001.png', 'L'), lab)
    with pytest.raises(DatasetLayoutError, match="grayscale"): read_label_png(tmp_path/'2007_000032.png', 'L')
    im.convert('RGB').save(tmp_path/'rgb.png')
    with pytest.raises(DatasetLayoutError, match="'RGB' image.*mapped back"): read_label_png(tmp_path/'rgb.png')


COCOVID_SAMPLE = """{
 "categories": [{"id": 1, "name": "airplane", "encode_name": "n02691156"}, {"id": 9, "name": "dog", "encode_name": "n02084071"}],
 "videos": [{"id": 1, "name": "train/ILSVRC2015_VID_train_0000/ILSVRC2015_train_00000000", "vid_train_frames": [0, 1]}],
 "images": [{"file_name": "train/ILSVRC2015_VID_train_0000/ILSVRC2015_train_00000000/000000.JPEG", "height": 20, "width": 40, "id": 1, "frame_id": 0, "video_id": 1, "is_vid_train_frame": true},
            {"file_name": "train/ILSVRC2015_VID_train_0000/ILSVRC2015_train_00000000/000001.JPEG", "height": 20, "width": 40, "id": 2, "frame_id": 1, "video_id": 1, "is_vid_train_frame": true}],
 "annotations": [{"id": 1, "video_id": 1, "image_id": 1, "category_id": 9, "instance_id": 1, "bbox": [3, 4, 10, 8], "area": 80, "iscrowd": false, "occluded": false, "generated": false},
                 {"id": 2, "video_id": 1, "image_id": 2, "category_id": 9, "instance_id": 1, "bbox": [5, 4, 10, 8], "area": 80, "iscrowd": false, "occluded": false, "generated": false},
                 {"id": 3, "video_id": 1, "image_id": 2, "category_id": 1, "instance_id": 2, "bbox": [20, 2, 9, 5], "area": 45, "iscrowd": false, "occluded": true, "generated": false}]
}"""


def test_cocovid(tmp_path):
    cl = make_clips(3, T=4, seed=5, p_degrade=0.5, max_objects=3)
    write_cocovid(cl, tmp_path/'vid.json', tmp_path/'Data')
    v = read_cocovid(tmp_path/'vid.json'); o = cl.frames.objects
    assert [len(x['frames']) for x in v['videos'].values()] == [4, 4, 4]
    assert set(v['tracks']) == set(cl.track[o['area'] > 0].tolist())
    for tid, tr in v['tracks'].items():
        for im, f, box in tr:
            k = np.nonzero((o['image'] == im - 1) & (cl.track == tid))[0][0]
            assert f == (im - 1) % 4; np.testing.assert_allclose(box, o['box'][k])
    js = json.loads((tmp_path/'vid.json').read_text())
    assert js['images'][5]['degradation']['blur'] == int(cl.degradations['blur'][1, 1])
    for c in range(3):                                     # the per-frame degradations come back through the reader
        for t, im in enumerate(v['videos'][c + 1]['frames']):
            d = v['instances']['images'][im]['degradation']
            assert (d['blur'], d['contrast'], d['bar']) == (int(cl.degradations['blur'][c, t]), float(cl.degradations['contrast'][c, t]), cl.degradations['bar'][c, t].tolist())
    assert (tmp_path/'Data'/js['images'][5]['file_name']).is_file()
    (tmp_path/'hand.json').write_text(COCOVID_SAMPLE)
    h = read_cocovid(tmp_path/'hand.json')
    assert h['videos'][1]['frames'] == [1, 2] and [f for _, f, _ in h['tracks'][1]] == [0, 1] and h['tracks'][2][0][2] == [20, 2, 29, 7]
    js = json.loads(COCOVID_SAMPLE); js['annotations'][0].pop('instance_id'); (tmp_path/'bad.json').write_text(json.dumps(js))
    with pytest.raises(DatasetLayoutError, match=r"lacks \['instance_id'\]"): read_cocovid(tmp_path/'bad.json')
    js = json.loads(COCOVID_SAMPLE); js.pop('videos'); (tmp_path/'bad.json').write_text(json.dumps(js))
    with pytest.raises(DatasetLayoutError, match=r"no \['videos'\] list"): read_cocovid(tmp_path/'bad.json')


def test_hpatches(tmp_path):
    hp = make_homography_pairs(2, views=6, seed=4)
    for s, d in enumerate(write_hpatches(hp, tmp_path/'hpatches-sequences-release')):
        q = read_hpatches_sequence(d)
        np.testing.assert_allclose(q['H'], hp.H[s], atol=1e-6); np.testing.assert_array_equal(np.stack(q['images']), hp.images[s])
    # hand-written: the text layout of HPatches' H_1_k (OpenCV convention: pixel centres at integers)
    d = tmp_path/'v_handmade'; d.mkdir()
    for k in range(1, 7): Image.fromarray(np.full((10, 12, 3), 40 * k, np.uint8)).save(d/f'{k}.ppm')
    Hcv = np.array([[0.9, 0.02, 3.5], [-0.01, 1.1, -2.0], [1e-4, -2e-4, 1.0]])
    for k in range(2, 7): (d/f'H_1_{k}').write_text('0.9 0.02 3.5\n-0.01 1.1 -2\n0.0001 -0.0002 1\n')
    q = read_hpatches_sequence(d); assert q['kind'] == 'viewpoint' and q['images'][2].shape == (10, 12, 3) and q['images'][2][0, 0, 0] == 120
    x = np.array([4.0, 7.0, 1.0]); y_cv = Hcv @ x; y = q['H'][1] @ (x + [0.5, 0.5, 0])     # the same point in both conventions
    np.testing.assert_allclose(y[:2] / y[2] - 0.5, y_cv[:2] / y_cv[2], atol=1e-9)
    (d/'H_1_5').write_text('1 0 0\n0 1 0\n'); os.remove(d/'6.ppm')
    with pytest.raises(DatasetLayoutError, match=r"lacks \['6.ppm'\]"): read_hpatches_sequence(d)
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(d/'6.ppm')
    with pytest.raises(DatasetLayoutError, match=r'H_1_5 holds a \(2, 3\) array'): read_hpatches_sequence(d)


# --- dataset cards: every fixture passes its own checker; missing pieces are named ----------------------------------
from xwlearn.vision.datasets import DATASETS, write_fixture, check_layout, megadepth_views, load_npz_restricted
from xwlearn.vision.scenes import apply_homography


@pytest.mark.parametrize('name', sorted(DATASETS))
def test_dataset_fixture_and_check(tmp_path, name):
    if name == 'megadepth': pytest.importorskip('h5py')
    card = DATASETS[name]
    assert card.source and card.licence and card.layout.strip() and card.size and card.prepare and card.papers
    root = write_fixture(name, tmp_path/name, seed=1)
    assert check_layout(name, root, deep=True)
    with pytest.raises(DatasetLayoutError, match='expected layout'): check_layout(name, tmp_path/'nothing_here')


def test_dataset_checks_name_what_is_missing(tmp_path):
    root = write_fixture('cityscapes', tmp_path/'cs')
    victim = next((root/'gtFine/val').glob('*/*_labelTrainIds.png')); victim.unlink()
    with pytest.raises(DatasetLayoutError, match=r"createTrainIdLabelImgs.*missing \['gtFine/val/frankfurt/.*_gtFine_labelTrainIds.png'\]"):
        check_layout('cityscapes', root)
    root = write_fixture('refcoco', tmp_path/'ref'); (root/'refcocog/refs(google).p').unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing \['refcocog/refs\(google\).p'\]"): check_layout('refcoco', root)
    with pytest.raises(ValueError, match='expected one of'): write_fixture('imagenet21k', tmp_path)


def test_megadepth_geometry_and_restricted_npz(tmp_path):
    ims, K, poses, depths, Hs, pairs = megadepth_views(3, seed=2)
    g = np.arange(96) + .5; px = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    X = depths[0].reshape(-1, 1) * (np.concatenate([px, np.ones((len(px), 1))], 1) @ np.linalg.inv(K[0]).T)
    for k in (1, 2):
        Xk = X @ poses[k][:3, :3].T + poses[k][:3, 3]; pk = Xk @ K[k].T; pk = pk[:, :2] / pk[:, 2:]
        np.testing.assert_allclose(pk, apply_homography(Hs[k], px), atol=1e-8)
        np.testing.assert_allclose(pairs.H[0, k], Hs[k])
    info = np.empty(2, object); info[0] = ((0, 1), 0.4, np.zeros(3)); info[1] = ((1, 2), 0.2, np.zeros(1))
    np.savez(tmp_path/'0015_0.1_0.3.npz', image_paths=np.array(['Undistorted_SfM/0015/images/a.jpg', None], object), intrinsics=K, pair_infos=info)
    s = load_npz_restricted(tmp_path/'0015_0.1_0.3.npz')
    assert s['pair_infos'][1][0] == (1, 2) and s['image_paths'][1] is None and (s['intrinsics'] == K).all()
    bad = np.empty(1, object); bad[0] = _Evil(); np.savez(tmp_path/'bad.npz', x=bad)
    with pytest.raises(pickle.UnpicklingError, match='is not allowed'): load_npz_restricted(tmp_path/'bad.npz')
