"Round trips of the fixture writers through xwlearn's loaders and torchvision's readers, layout errors, loader shapes."
import os, pickle
import numpy as np, pytest, torch, torchvision
from PIL import Image
from xwlearn.data import (DatasetLayoutError, SHAPE_CLASSES, CIFAR10_STATS, make_shapes_classification, write_imagefolder,
                          write_cifar10_pickles, check_cifar10_layout, check_imagefolder_layout, read_cifar10,
                          cifar10_dls, imagenet_dls, digits_dls, mnist1d_arrays, mnist1d_dls, shapes_dls, tensor_dls)

class CIFAR10NoMD5(torchvision.datasets.CIFAR10):
    "torchvision's reader with the md5 checks of the real files off (a fixture cannot match them)."
    train_list = [[f, None] for f, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[f, None] for f, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, 'md5': None}

@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar')
    ims, lbls, names = make_shapes_classification(120, seed=0)
    write_cifar10_pickles(root, ims, lbls, label_names=names)
    return root, ims, lbls, names

@pytest.fixture(scope='module')
def inet(tmp_path_factory):
    root = tmp_path_factory.mktemp('inet')
    ims, lbls, names = make_shapes_classification(20, size=40, seed=0)
    write_imagefolder(root, ims, lbls, names, 'train')
    write_imagefolder(root, *make_shapes_classification(10, size=40, seed=1), 'val')
    return root, ims, lbls, names

def test_cifar10_roundtrip(cifar):
    root, ims, lbls, names = cifar
    d = check_cifar10_layout(root)
    assert sorted(os.listdir(d)) == sorted([f'data_batch_{i}' for i in range(1, 6)] + ['test_batch', 'batches.meta'])
    with open(d/'data_batch_1', 'rb') as f: raw = pickle.load(f, encoding='bytes')  # the CIFAR web page's reader
    assert raw[b'data'].shape == (20, 3072) and raw[b'data'].dtype == np.uint8
    np.testing.assert_array_equal(raw[b'data'][0, 1024:2048].reshape(32, 32), ims[0, :, :, 1])  # green plane
    tv = CIFAR10NoMD5(root, train=True, download=False)
    np.testing.assert_array_equal(tv.data, ims[:100]); assert tv.targets == lbls[:100].tolist() and tv.classes == names
    tv_test = CIFAR10NoMD5(root, train=False)
    np.testing.assert_array_equal(tv_test.data, ims[100:])
    r = read_cifar10(root)
    np.testing.assert_array_equal(r['x'].permute(0, 2, 3, 1).numpy(), ims[:100])
    np.testing.assert_array_equal(r['y_test'].numpy(), lbls[100:]); assert r['classes'] == names

def test_cifar10_dls(cifar):
    root, ims, lbls, names = cifar
    dls = cifar10_dls(root, bs=16, device='cpu')
    xb, yb = dls.one_batch()
    assert xb.shape == (16, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert dls.vocab == names and dls.c == len(names) and len(dls.valid_ds) == 20
    xv = torch.cat([x for x, _ in dls.valid])
    m, s = (torch.tensor(v)[:, None, None] for v in CIFAR10_STATS)
    torch.testing.assert_close(xv, (torch.from_numpy(ims[100:]).permute(0, 3, 1, 2) / 255 - m) / s)
    small = cifar10_dls(root, bs=8, size=16, n_train=32, n_valid=8, device='cpu')
    assert small.one_batch()[0].shape == (8, 3, 16, 16) and len(small.train_ds) == 32
    b1, b2 = (cifar10_dls(root, bs=16, seed=3, device='cpu').one_batch() for _ in range(2))
    assert torch.equal(b1[0], b2[0]) and torch.equal(b1[1], b2[1])

def test_imagefolder_roundtrip(inet):
    root, ims, lbls, names = inet
    assert check_imagefolder_layout(root) == {'train': sorted(names), 'val': sorted(names)}
    tv = torchvision.datasets.ImageFolder(root/'train')
    assert tv.classes == sorted(names) and len(tv) == 20
    for k in (0, 7):
        im, y = tv[k]; i = int(os.path.basename(tv.samples[k][0]).split('.')[0])
        np.testing.assert_array_equal(np.asarray(im), ims[i]); assert tv.classes[y] == names[lbls[i]]
    dls = imagenet_dls(root, bs=4, size=32, num_workers=0, device='cpu')
    xb, yb = dls.one_batch()
    assert xb.shape == (4, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert dls.vocab == sorted(names) and len(dls.train_ds) == 20 and len(dls.valid_ds) == 10
    assert len(imagenet_dls(root, size=32, n_per_class=1, num_workers=0, device='cpu').train_ds) == 5
    xv, _ = next(iter(dls.valid)); assert xv.shape == (4, 3, 32, 32)
    b1 = next(iter(imagenet_dls(root, bs=4, size=32, num_workers=0, seed=1, device='cpu').train))
    b2 = next(iter(imagenet_dls(root, bs=4, size=32, num_workers=2, seed=1, device='cpu').train))
    assert torch.equal(b1[0], b2[0]) and torch.equal(b1[1], b2[1])

def test_cifar10_layout_errors(tmp_path, cifar):
    with pytest.raises(DatasetLayoutError, match='does not exist'): cifar10_dls(tmp_path/'nope')
    with pytest.raises(DatasetLayoutError, match=r'cifar-10-batches-py/\{data_batch_1\.\.5,test_batch,batches\.meta\}'):
        check_cifar10_layout(tmp_path)
    (tmp_path/'cifar-10-python.tar.gz').touch()
    with pytest.raises(DatasetLayoutError, match='tar -xzf'): check_cifar10_layout(tmp_path)
    d = tmp_path/'c'/'cifar-10-batches-py'; d.mkdir(parents=True)
    for f in os.listdir(cifar[0]/'cifar-10-batches-py'):
        if f != 'test_batch': (d/f).write_bytes((cifar[0]/'cifar-10-batches-py'/f).read_bytes())
    with pytest.raises(DatasetLayoutError, match='is missing test_batch'): cifar10_dls(tmp_path/'c')
    (d/'test_batch').write_bytes(b'garbage')
    with pytest.raises(DatasetLayoutError, match='could not read .*test_batch'): read_cifar10(tmp_path/'c')
    with open(d/'test_batch', 'wb') as f: pickle.dump({'data': os.system}, f, protocol=2)  # never executed
    with pytest.raises(DatasetLayoutError, match='not allowed'): read_cifar10(d)
    assert issubclass(DatasetLayoutError, ValueError)

def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match='does not exist'): imagenet_dls(tmp_path/'nope')
    with pytest.raises(DatasetLayoutError, match="has no 'train' folder"): check_imagefolder_layout(tmp_path)
    (tmp_path/'train'/'cat').mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match='class folders without images'): check_imagefolder_layout(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path/'train'/'cat'/'a.png')
    with pytest.raises(DatasetLayoutError, match=r"has no 'val' folder.*\{train,val\}/<class>/<image>"):
        check_imagefolder_layout(tmp_path)
    (tmp_path/'val').mkdir()
    with pytest.raises(DatasetLayoutError, match='is empty'): check_imagefolder_layout(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path/'val'/'x.JPEG')
    with pytest.raises(DatasetLayoutError, match='images directly but no class folders'): imagenet_dls(tmp_path)
    os.remove(tmp_path/'val'/'x.JPEG'); (tmp_path/'val'/'dog').mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path/'val'/'dog'/'b.png')
    with pytest.raises(DatasetLayoutError, match='classes not in'): check_imagefolder_layout(tmp_path)
    assert check_imagefolder_layout(tmp_path, splits=('train',)) == {'train': ['cat']}

def test_mnist1d_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('XWLEARN_CACHE', str(tmp_path))
    a = mnist1d_arrays(n_train=160, n_test=40)
    files = os.listdir(tmp_path); assert len(files) == 1 and files[0].endswith('.npz')  # no temp files left
    b = mnist1d_arrays(n_train=160, n_test=40)
    for k in a: np.testing.assert_array_equal(a[k], b[k])
    assert a['x'].shape == (160, 40) and a['x'].dtype == np.float32 and a['y_test'].dtype == np.int64
    assert not np.array_equal(mnist1d_arrays(seed=1, n_train=160, n_test=40)['x'], a['x'])
    dls = mnist1d_dls(bs=32, n_train=160, n_test=40, device='cpu')
    xb, yb = dls.one_batch(); assert xb.shape == (32, 40) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    xb, _ = mnist1d_dls(bs=32, n_train=160, n_test=40, as_channels=True, device='cpu').one_batch()
    assert xb.shape == (32, 1, 40)

def test_offline_dls():
    dls = digits_dls(device='cpu'); xb, yb = dls.one_batch()
    assert xb.shape == (64, 1, 8, 8) and yb.dtype == torch.int64 and len(dls.train_ds) + len(dls.valid_ds) == 1797
    dls = shapes_dls(n_train=128, n_valid=32, bs=32, augment=True, device='cpu'); xb, yb = dls.one_batch()
    assert xb.shape == (32, 3, 32, 32) and xb.dtype == torch.float32 and dls.vocab == list(SHAPE_CLASSES)
    i1, l1, _ = make_shapes_classification(10, seed=5); i2, l2, _ = make_shapes_classification(10, seed=5)
    assert i1.dtype == np.uint8 and i1.shape == (10, 32, 32, 3) and np.array_equal(i1, i2) and np.array_equal(l1, l2)

def test_tensor_dl_epoch():
    x = torch.arange(100.)[:, None]; y = torch.zeros(100, dtype=torch.long)
    dls = tensor_dls(x, y, x, y, bs=32, seed=0, device='cpu')
    seen = torch.cat([xb for xb, _ in dls.train])[:, 0]
    assert len(seen) == 96 and len(seen.unique()) == 96  # a permutation, last partial batch dropped
    assert torch.equal(torch.cat([xb for xb, _ in dls.valid]), x)
    e1 = torch.cat([xb for xb, _ in tensor_dls(x, y, x, y, bs=32, seed=0, device='cpu').train])
    assert torch.equal(seen, e1[:, 0])

def test_deit_augmentation_is_seeded_per_item(tmp_path):
    "timm's RandAugment draws from python's and numpy's generators: the same (seed, epoch, index) gives the same image."
    import torch
    from xwlearn.data import write_imagefolder, make_shapes_classification, imagenet_dls
    ims, ys, vocab = make_shapes_classification(40, size=48, seed=0)
    for split in ("train", "val"): write_imagefolder(tmp_path, ims, ys, vocab, split=split)
    ds1, ds2 = imagenet_dls(tmp_path, tfm='deit', smoke=True).train.dataset, imagenet_dls(tmp_path, tfm='deit', smoke=True).train.dataset
    assert torch.equal(ds1[3][0], ds2[3][0])
    ds2.set_epoch(1)
    assert not torch.equal(ds1[3][0], ds2[3][0])
