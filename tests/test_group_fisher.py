"""Group Fisher pruning (`xwlearn.prune.group_fisher`): grouping on torchvision nets, hook Fisher vs autograd, removal,
resuming mid-pruning. The recipes' smoke runs (ResNet-50 ImageNet, RetinaNet COCO) are in the companion notebook
`nbs/30_compression/02a_repro.group_fisher.ipynb` (one pytest case of `tests/test_notebooks.py`)."""
import math, pytest, torch, torchvision
import torch.nn.functional as F
from xwlearn.prune.group_fisher import GroupFisher, trace_groups, prune_model, count_flops
from xwlearn.repro.group_fisher import small_resnet_dw

torch.set_num_threads(1)


def test_resnet50_bottleneck_groups():
    g = trace_groups(torchvision.models.resnet50(weights=None).eval(), torch.randn(1, 3, 32, 32))
    assert torch.equal(g.consumers['layer2.0.conv1'], g.consumers['layer2.0.downsample.0'])
    assert (g.consumers['layer2.0.conv1'] >= 0).all()


@pytest.mark.parametrize('fn', [torchvision.models.resnet50, torchvision.models.mobilenet_v2, torchvision.models.regnet_x_400mf])
def test_prune_coupled_groups_forward(fn):
    torch.manual_seed(0); m = fn(weights=None).eval(); x = torch.randn(2, 3, 32, 32)
    gf = GroupFisher(m, x)
    coupled = [i for i, mem in enumerate(gf.groups.members) if len(mem['consumers']) > 1][:4]
    for i in coupled: gf.prune_group(i)
    with torch.no_grad(): y0 = m(x); pm = prune_model(gf); y1 = pm(x)
    assert y1.shape == (2, 1000) and torch.allclose(y0, y1, atol=1e-4)
    assert count_flops(pm, x) == gf.flops() < gf.flops0


def test_hook_fisher_equals_autograd_mask():
    torch.manual_seed(0)
    net = small_resnet_dw().double().eval(); xb, yb = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    gf = GroupFisher(net, xb)
    F.cross_entropy(net(xb), yb, reduction='sum').backward(); gf.accumulate(); gf.collect = False
    mg = torch.ones(len(gf.groups), dtype=torch.float64, requires_grad=True)
    def grad_n(n):
        for k, idx in gf.groups.consumers.items():
            if idx is not None:
                gf.masks[k] = torch.where(idx >= 0, mg[idx.clamp(min=0)], torch.ones(len(idx), dtype=torch.float64))
        return torch.autograd.grad(F.cross_entropy(net(xb[n:n+1]), yb[n:n+1], reduction='sum'), mg)[0]
    ps = torch.stack([grad_n(n) for n in range(4)])
    assert torch.allclose(gf.fisher, (ps ** 2).sum(0), rtol=1e-8, atol=1e-12)


def test_criteria_and_step():
    net = small_resnet_dw().eval(); x = torch.randn(2, 1, 8, 8)
    for c in ('memory', 'flops', 'none', 'l1'):
        gf = GroupFisher(net, x, c); f0 = gf.flops(); i = gf.step()
        assert not gf.alive[i] and gf.flops() < f0; gf.remove()


# --- concatenation grouping ------------------------------------------------------------------------
class _Cat(torch.nn.Module):
    "Two producers (4 and 5 channels) whose outputs are concatenated and read by one consumer conv."
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 5, 1)
        self.c = torch.nn.Conv2d(9, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 2)
    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.head(F.adaptive_avg_pool2d(F.relu(self.c(y)), 1).flatten(1))


def test_concat_grouping_and_removal():
    torch.manual_seed(0); net = _Cat().eval(); x = torch.randn(2, 3, 8, 8)
    g = trace_groups(net, x)
    pa, pb, cc = g.producers['a'], g.producers['b'], g.consumers['c']
    assert (pa >= 0).all() and (pb >= 0).all()
    assert torch.equal(cc[:4], pa) and torch.equal(cc[4:], pb)          # c's inputs split into a's and b's groups
    assert len(set(pa.tolist()) | set(pb.tolist())) == 9                # one group per channel, none shared
    gf = GroupFisher(net, x)
    for k in (pa[1], pa[3], pb[0], pb[4]): gf.prune_group(int(k))
    with torch.no_grad(): y0 = net(x); pm = prune_model(gf); y1 = pm(x)
    assert (pm.a.out_channels, pm.b.out_channels, pm.c.in_channels) == (2, 3, 5)
    assert torch.allclose(y0, y1, atol=1e-5)                            # pruned model == masked model


# --- resuming a run mid-pruning --------------------------------------------------------------------
from pathlib import Path
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import SGD
from xwlearn import core
from xwlearn.core import recipe
from xwlearn.recipes import train
from xwlearn.data import TensorDS, TensorDL
from xwlearn.prune.group_fisher import GroupFisherPruning

_KILL_AT = {'epoch': None}

class _Kill(Callback):
    "Simulates a crash at the start of an epoch (after the previous epoch's checkpoint was written)."
    order = 100
    def before_epoch(self):
        if _KILL_AT['epoch'] is not None and self.epoch == _KILL_AT['epoch']: raise RuntimeError('killed')


def _group_fisher_test_resume(data, epochs, smoke=False):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g)
    ds = TensorDS(x, y, vocab=[str(i) for i in range(10)])
    dls = DataLoaders(TensorDL(ds, bs=8, shuffle=False), TensorDL(TensorDS(x[:16], y[:16]), bs=8), device='cpu')
    net = small_resnet_dw()
    gf = GroupFisher(net, x[:2])
    cb = GroupFisherPruning(gf, interval=4, target=0.6, prune_lr=0.01, ft_lr=0.01, remove_at_end=True)
    return Learner(dls, net, torch.nn.CrossEntropyLoss(), opt_func=SGD, lr=0.01, cbs=[cb, _Kill()])


def test_resume_mid_pruning(tmp_path, monkeypatch):
    monkeypatch.setattr(core, 'RECIPES', dict(core.RECIPES))   # the test recipe stays out of the global registry
    recipe('group_fisher_test_resume', paper='group_fisher', dataset='cifar10', epochs=3, smoke_epochs=3,
           description='test only: small residual net on fixed random data, pruning across epochs')(_group_fisher_test_resume)
    _KILL_AT['epoch'] = None
    full = train('group_fisher_test_resume', tmp_path, smoke=True, out_dir=tmp_path/'full', quiet=True)
    cb_full = full.group_fisher_pruning
    _KILL_AT['epoch'] = 1
    with pytest.raises(RuntimeError, match='killed'):
        train('group_fisher_test_resume', tmp_path, smoke=True, out_dir=tmp_path/'run', quiet=True)
    ck = torch.load(tmp_path/'run'/'last.pth', weights_only=True)
    assert ck['epoch'] == 0 and ck['cbs']['GroupFisherPruning']['count'] == 6   # killed mid-pruning, state saved
    assert 0 < int((~ck['cbs']['GroupFisherPruning']['gf']['alive']).sum()) < int((~cb_full.gf.alive).sum())
    _KILL_AT['epoch'] = None
    res = train('group_fisher_test_resume', tmp_path, smoke=True, out_dir=tmp_path/'run', resume=True, quiet=True)
    cb_res = res.group_fisher_pruning
    assert cb_res.count == cb_full.count and cb_res.i0 == cb_full.i0
    assert torch.equal(cb_res.gf.alive, cb_full.gf.alive)                                 # the same groups pruned
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(res.model) == shapes(full.model) and shapes(full.model) != shapes(small_resnet_dw())
    for (k, a), b in zip(full.model.state_dict().items(), res.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k
    pm = torch.load(tmp_path/'run'/'model.pth', weights_only=True)                         # model.pth is the pruned net
    assert {k: tuple(v.shape) for k, v in pm.items()} == shapes(full.model)


# --- ops over the channel dimension that the grouping does not understand ------------------------
import pickle, warnings
from fastai.callback.progress import ProgressCallback  # adds Learner.no_bar
import torch.nn as nn


class _ChanOp(nn.Module):
    """Conv `a` (8 channels at 8×8) read whole by conv `b` and by an op over the channel dimension (`topk`, `max`/`min`, `sort`,
    or `mean(1)`, whose (N, 8, 8) result looks like 8 channels to the Conv1d `c`)."""
    def __init__(self, op):
        super().__init__(); self.op = op
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv1d(8, 2, 1)
        self.head = nn.Linear(8 + 2, 4)
    def forward(self, x):
        y = F.relu(self.a(x))
        if self.op == 'topk': t = y.topk(2, dim=1).values
        elif self.op == 'max': t = torch.cat([y.max(1, keepdim=True)[0], y.min(1, keepdim=True)[0]], 1)
        elif self.op == 'sort': t = y.sort(1)[0][:, :2]
        elif self.op == 'mean': t = self.c(y.mean(1))
        return self.head(torch.cat([F.relu(self.b(y)).mean((2, 3)), t.flatten(2).mean(2)], 1))


class _Chunk(nn.Module):
    "Conv `a`'s output is split in two along channels (pieces to convs `b`, `c`) and also read whole by conv `d`."
    def __init__(self, how):
        super().__init__(); self.how = how
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 2)
    def forward(self, x):
        y = F.relu(self.a(x))
        p, q = y.chunk(2, dim=1) if self.how == 'chunk' else torch.split(y, 4, 1)
        return self.head(F.adaptive_avg_pool2d(self.b(p) + self.c(q) + self.d(y), 1).flatten(1))


@pytest.mark.parametrize('net,op', [(_ChanOp('topk'), 'topk'), (_ChanOp('max'), 'max'), (_ChanOp('sort'), 'sort'),
                                    (_ChanOp('mean'), 'mean'), (_Chunk('chunk'), 'chunk'), (_Chunk('split'), 'split')])
def test_channel_ops_keep_their_inputs(net, op):
    "An op over channels that the tracer does not understand keeps the channels it reads (with a warning naming op, node and layer)."
    torch.manual_seed(0); net.eval(); x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match=rf"(?s){op}.*node.*'a'"): gf = GroupFisher(net, x)
    assert (gf.groups.producers['a'] < 0).all() and (gf.groups.consumers['d' if op in ('chunk', 'split') else 'b'] < 0).all()
    for i in range(len(gf.groups)):
        if gf.prunable()[i]: gf.prune_group(i)
    with torch.no_grad(): y0 = net(x); y1 = prune_model(gf)(x)
    assert torch.allclose(y0, y1, atol=1e-5)                             # the pruned network computes what the masked one does


def test_supported_nets_trace_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        trace_groups(small_resnet_dw().eval(), torch.randn(2, 1, 8, 8)); trace_groups(_Cat().eval(), torch.randn(2, 3, 8, 8))


# --- nothing left to prune ----------------------------------------------------------------------------
class _Plain(nn.Module):
    def __init__(self): super().__init__(); self.a = nn.Conv2d(3, 4, 3); self.head = nn.Linear(4, 2)
    def forward(self, x): return self.head(F.adaptive_avg_pool2d(self.a(x), 1).flatten(1))


def test_step_stops_when_nothing_is_prunable():
    torch.manual_seed(0); gf = GroupFisher(_Plain(), torch.randn(2, 3, 8, 8))
    picked = [gf.step() for _ in range(3)]                              # 4 groups on conv a's 4 channels: 3 may go
    assert None not in picked and int(gf.alive.sum()) == 1
    assert gf.step() is None and int(gf.alive.sum()) == 1 and gf.counts()['a'] == (3, 1)


def test_pruning_phase_ends_when_nothing_is_prunable():
    torch.manual_seed(0); xs, ys = torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,))
    dls = DataLoaders(TensorDL(TensorDS(xs, ys), bs=4), TensorDL(TensorDS(xs[:4], ys[:4]), bs=4), device='cpu')
    net = _Plain(); gf = GroupFisher(net, xs[:2])
    cb = GroupFisherPruning(gf, interval=1, target=0.1, ft_lr=0.01)     # 0.1 × FLOPs cannot be reached: conv a keeps 1 channel
    learn = Learner(dls, net, torch.nn.CrossEntropyLoss(), opt_func=SGD, lr=0.01, cbs=cb)
    with pytest.warns(UserWarning, match='no channel group can be pruned'):
        with learn.no_bar(), learn.no_logging(): learn.fit(2)
    assert not cb.pruning and cb.i0 == 4 and int(gf.alive.sum()) == 1


def test_no_groups_at_all():
    net = nn.Sequential(nn.Conv2d(3, 1, 3), nn.Flatten(), nn.Linear(36, 2))   # 1 channel, then a flatten of 6×6 maps
    with pytest.warns(UserWarning, match='no channel group can be pruned'): gf = GroupFisher(net, torch.randn(2, 3, 8, 8))
    assert len(gf.groups) == 0 and gf.flops() == gf.flops0 and gf.step() is None


# --- checkpoints are loaded as weights only --------------------------------------------------------
class _Payload:
    "Unpickling this object creates a file: what a malicious `weights=` checkpoint would run."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (open, (self.marker, 'w'))


@pytest.mark.parametrize('name', ['imagenet', 'coco'])
def test_recipe_weights_are_loaded_weights_only(tmp_path, monkeypatch, name):
    from xwlearn.repro.group_fisher import group_fisher_imagenet_resnet50, group_fisher_coco_retinanet_r50
    marker, evil = tmp_path/'pwned', tmp_path/'evil.pth'
    torch.save({'w': _Payload(marker)}, evil)
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')         # torch's weights-only default switched off
    if name == 'imagenet':
        from xwlearn.data import write_imagefolder, make_shapes_classification
        ims, ys, names = make_shapes_classification(8, size=32, seed=0)
        for split in ('train', 'val'): write_imagefolder(tmp_path/'data', ims, ys, names, split=split)
        run = lambda: group_fisher_imagenet_resnet50(tmp_path/'data', smoke=True, weights=str(evil))
    else:
        from xwlearn.vision.detection import write_coco_shapes
        write_coco_shapes(tmp_path/'coco', n_train=2, n_val=1, size=64, seed=0)
        run = lambda: group_fisher_coco_retinanet_r50(tmp_path/'coco', smoke=True, weights=str(evil))
    with pytest.raises(pickle.UnpicklingError): run()
    assert not marker.exists()


# --- grouped convolutions: the pruning unit is a whole conv-group (the paper's g × c/g reshape) -----
from torch.nn.modules.conv import _ConvNd


class _ResNeXtBlock(nn.Module):
    "Stem, one ResNeXt bottleneck (1×1 `a` → 3×3 GConv `b`, 3 conv-groups of 4, stride 2 → 1×1 `c`, strided shortcut), head."
    def __init__(self, c=8, width=12, g=3):
        super().__init__()
        self.stem, self.down, self.head = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 1, 2, bias=False), nn.Linear(c, 4)
        self.a, self.ba = nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width)
        self.b, self.bb = nn.Conv2d(width, width, 3, 2, 1, groups=g, bias=False), nn.BatchNorm2d(width)
        self.c, self.bc = nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c)
    def forward(self, x):
        x = F.relu(self.stem(x)); y = F.relu(self.bb(self.b(F.relu(self.ba(self.a(x))))))
        return self.head(F.relu(self.bc(self.c(y)) + self.down(x)).mean((2, 3)))


def _random_bn(net):
    for p in net.modules():
        if isinstance(p, nn.BatchNorm2d): p.running_mean.uniform_(-1, 1); p.running_var.uniform_(.5, 2); p.weight.data.uniform_(.5, 2)
    return net.eval()


def test_grouped_conv_prunes_whole_conv_groups():
    torch.manual_seed(0); net, x = _random_bn(_ResNeXtBlock()), torch.randn(2, 3, 8, 8)
    gf = GroupFisher(net, x); g = gf.groups
    assert torch.equal(g.consumers['b'], torch.arange(3).repeat_interleave(4) + g.consumers['b'][0])  # one group per conv-group
    k = int(g.consumers['b'][4])
    assert g.members[k] == dict(producers=[(l, c) for l in 'ab' for c in range(4, 8)],
                                consumers=[(l, c) for l in 'bc' for c in range(4, 8)],
                                bns=[(l, c) for l in ('ba', 'bb') for c in range(4, 8)])
    assert gf.memory[k] == 4 * (8 * 8 + 4 * 4)                          # n·(c/g)·h·w for a (8×8) and for b (4×4)
    f0 = gf.flops(); gf.prune_group(k)
    assert f0 - gf.flops() == 4 * 8 * 64 + 4 * 4 * 9 * 16 + 8 * 4 * 16  # a's 4 filters, b's conv-group, c's 4 inputs
    with torch.no_grad(): y0 = net(x); pm = prune_model(gf); y1 = pm(x)
    assert (pm.a.out_channels, pm.b.in_channels, pm.b.out_channels, pm.b.groups, pm.c.in_channels) == (8, 8, 8, 2, 8)
    assert torch.equal(pm.b.weight[4:], net.b.weight[8:]) and torch.equal(pm.a.weight[4:], net.a.weight[8:])
    assert torch.allclose(y0, y1, atol=1e-5) and count_flops(pm, x) == gf.flops()


def test_resnext50_prunes_conv_groups():
    torch.manual_seed(0); m = torchvision.models.resnext50_32x4d(weights=None).eval(); x = torch.randn(2, 3, 32, 32)
    gf = GroupFisher(m, x); name = 'layer1.0.conv2'; b = m.layer1[0].conv2          # 32 conv-groups of 4 channels
    idx = gf.groups.consumers[name]; assert len(set(idx.tolist())) == b.groups
    for i in sorted(set(idx.tolist()))[:3]: gf.prune_group(i)
    with torch.no_grad(): y0 = m(x); pm = prune_model(gf); y1 = pm(x)
    c2 = pm.get_submodule(name)
    assert (c2.groups, c2.in_channels, pm.layer1[0].conv1.out_channels, pm.layer1[0].conv3.in_channels) == (29, 116, 116, 116)
    assert torch.allclose(y0, y1, atol=1e-4) and count_flops(pm, x) == gf.flops()


def _conv_acts(model, x):
    "Activation elements per sample written by the Conv/Linear layers, counted with forward hooks."
    tot = [0]; hs = [m.register_forward_hook(lambda m, i, o: tot.__setitem__(0, tot[0] + o[0].numel()))
                     for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear))]
    with torch.no_grad(): model.eval()(x[:1])
    for h in hs: h.remove()
    return tot[0]


@pytest.mark.parametrize('make,shape', [(small_resnet_dw, (2, 1, 8, 8)), (_ResNeXtBlock, (2, 3, 8, 8))])
def test_memory_score_divides_by_the_memory_pruning_frees(make, shape):
    "fisher / memory-normalised score == the activations the physically pruned network no longer writes (counted)."
    torch.manual_seed(0); net, x = make().eval(), torch.randn(*shape)
    gf = GroupFisher(net, x); gf.fisher = torch.rand(len(gf.groups), dtype=torch.float64) + 0.1
    a0, s, sd = _conv_acts(prune_model(gf), x), gf.scores('memory'), gf.state_dict()
    ok = torch.nonzero(gf.prunable()).flatten().tolist()
    for i in ok[::max(1, len(ok) // 10)]:
        gf.prune_group(i); freed = a0 - _conv_acts(prune_model(gf), x); gf.load_state_dict(sd)
        assert freed > 0 and math.isclose(float(gf.fisher[i] / s[i]), freed, rel_tol=1e-9), (i, freed)


def test_random_criterion_is_seeded_and_resumable():
    net, x = small_resnet_dw().eval(), torch.randn(2, 1, 8, 8)
    picks = []
    for _ in range(2):
        gf = GroupFisher(net, x, 'random', seed=3); picks.append([gf.step() for _ in range(4)]); gf.remove()
    assert picks[0] == picks[1] and len(set(picks[0])) == 4
    gf = GroupFisher(net, x, 'random', seed=3); [gf.step() for _ in range(2)]; sd = gf.state_dict(); gf.remove()
    gf2 = GroupFisher(net, x, 'random', seed=99); gf2.load_state_dict(sd)
    assert [gf2.step() for _ in range(2)] == picks[0][2:]
