"""Group Fisher pruning (`xwlearn.prune.group_fisher`): grouping on torchvision nets, hook Fisher vs autograd, removal."""
import pytest, torch, torchvision
import torch.nn.functional as F
from xwlearn.prune.group_fisher import GroupFisher, trace_groups, prune_model, count_flops, small_resnet_dw

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
