"""The cost view of differentiable NAS (`xwlearn.nas.wiring`, reproduction in `xwlearn.repro.wiring`): hook-measured costs,
the output identity, "none", shapes."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xwlearn.nas.wiring import OPS, SuperNet, edge_list, search_learner
from xwlearn.repro.wiring import search_dls

torch.set_num_threads(1)


def _batch(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 40, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("mode", ["onehot", "softmax"])
@pytest.mark.parametrize("share", [True, False])
def test_hook_cost_equals_autograd_dL_dZ(mode, share):
    torch.manual_seed(0)
    net = SuperNet(C=6, n_cells=2, mode=mode, share_alpha=share).double(); net.set_record(True)
    x, y = _batch()
    shape = (5, 5) if share else (2, 5, 5)
    z = (net.sample_z() if mode == "onehot" else torch.rand(*shape, dtype=torch.float64)).detach().requires_grad_()
    assert z.shape == shape
    F.cross_entropy(net(x, z), y).backward()                   # mean loss: costs are per-sample / B
    c = net.costs().sum(0)                                     # (n_cells, E, K): the hooks measure every cell
    torch.testing.assert_close(c.sum(0) if share else c, z.grad, rtol=1e-9, atol=1e-12)   # shared: Σ over cells


@pytest.mark.parametrize("share", [True, False])
def test_dsnas_reward_shared_alpha_summed_over_cells(share):
    "Official code: one α (E, K), the same sample in every cell, edge reward = Σ_cells cost of the sampled op; per cell: its own."
    from xwlearn.nas.wiring import DSNASArch
    torch.manual_seed(4)
    net = SuperNet(C=6, n_cells=3, share_alpha=share).double(); net.set_record(True)
    assert net.alpha.shape == ((5, len(OPS)) if share else (3, 5, len(OPS))) and net.cell_probs().shape == (3, 5, len(OPS))
    with torch.no_grad(): net.alpha.normal_()
    x, y = _batch()
    F.cross_entropy(net(x), y).backward()                      # samples Z and wires the cells with it
    z = net.z.detach(); assert z.shape == net.alpha.shape
    c = net.costs().sum(0)                                     # (3, E, K) per-cell costs (batch-mean loss)
    reward = (c * z).sum((0, 2)) if share else (c * z).sum(-1)   # shared: Σ over cells of the sampled op's cost
    class _L: model = net
    arch = DSNASArch(); arch.learn = _L(); arch.before_fit()
    seen = []; arch.arch_opt.step = lambda: seen.append(net.alpha.grad.clone())
    arch.after_backward()
    torch.testing.assert_close(seen[0], reward[..., None] * (z - net.alpha.detach().softmax(-1)))


def test_none_has_zero_cost_and_unselected_ops_do():
    torch.manual_seed(1)
    net = SuperNet(C=6, n_cells=2).double(); net.set_record(True)
    x, y = _batch()
    z = F.one_hot(torch.full((2, 5), 2), len(OPS)).double().requires_grad_()   # conv3 on every edge: all nodes live
    F.cross_entropy(net(x, z), y, reduction="sum").backward()
    c = net.costs()
    assert OPS[0] == "none" and torch.all(c[..., 0] == 0)
    assert (c[..., 1:].abs() > 0).float().mean() > 0.9         # would-be costs of unselected ops are measured too


def test_output_cost_identity():
    "(∂L/∂h)ᵀh at the bias-free head = Σ p_k z_k − z_y; with edge costs: Σ_e Z·C − Σ_{e from node 2} δ·Z·C."
    torch.manual_seed(2)
    net = SuperNet(C=6, n_cells=2).double(); net.set_record(True)
    x, y = _batch(32)
    z = net.sample_z().detach().requires_grad_()                # shared α: one (E, K) sample for both cells
    logits = net(x, z); grads = []
    net.features.register_hook(grads.append)
    F.cross_entropy(logits, y, reduction="sum").backward()
    p = logits.detach().softmax(-1)
    out = (p * logits.detach()).sum(-1) - logits.detach().gather(1, y[:, None])[:, 0]
    torch.testing.assert_close((grads[0] * net.features.detach()).flatten(1).sum(1), out, rtol=1e-9, atol=1e-12)
    correct = logits.argmax(-1) == y
    assert (out[correct] <= 1e-12).all()
    deg = torch.tensor([0., 1., 0., 0., 1.], dtype=torch.float64)   # none, skip, conv-BN (scale invariant), avgpool
    c = net.costs()
    inner = [e for e, (i, j) in enumerate(edge_list(2)) if i >= 2]
    lhs = (c[:, -1] * z).sum((1, 2)) - (c[:, -1, inner] * z[inner] * deg).sum((1, 2))
    torch.testing.assert_close(lhs, out, rtol=1e-5, atol=1e-6)


def test_shapes_1d_2d():
    net = SuperNet(C=4, n_cells=3)
    assert net(torch.randn(5, 1, 40)).shape == (5, 10) and net.alpha.shape == (5, len(OPS))
    assert SuperNet(C=4, n_cells=3, share_alpha=False).alpha.shape == (3, 5, len(OPS))
    net2 = SuperNet(C=4, n_cells=2, n_nodes=4, in_ch=3, dim=2, mode="softmax")
    assert net2(torch.randn(2, 3, 16, 16)).shape == (2, 10) and net2.alpha.shape == (14, len(OPS))
    assert len(edge_list(4)) == 14
    with pytest.raises(ValueError, match="mode"): search_learner(search_dls(n=64), "enas")


@pytest.mark.parametrize("mode", ["dsnas", "darts"])
def test_search_inside_learner_fit(mode):
    torch.manual_seed(3)
    learn = search_learner(search_dls(n=256), mode, C=4, n_cells=2)
    a0 = learn.model.alpha.detach().clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    h = learn.cost_recorder.history
    assert len(h) == 1 and np.array(h[0]["cost"]).shape == (2, 5, 5) and np.isfinite(h[0]["out_cost"])
    assert not torch.equal(a0, learn.model.alpha.detach())
    if mode == "darts": assert len(learn.architect.history) == 1


def test_registered():
    from xwlearn.core import REPRODUCTIONS, RECIPES   # registered by importing xwlearn.repro.wiring (above)
    assert REPRODUCTIONS["wiring"].paper == "wiring"
    assert RECIPES["wiring_cifar10_dsnas"].dataset == "cifar10"


def test_small_training_split_and_control():
    from xwlearn.repro.wiring import run_search
    dls = search_dls(bs=32, n_train=64)
    assert len(dls.train.dataset) == 64 and len(dls.valid.dataset) == 2000
    with pytest.raises(ValueError, match="n_train"): search_dls(n_train=3000)
    with pytest.raises(ValueError, match="arch_split"): search_learner(dls, "darts", arch_split="test")
    r = run_search("darts", 1, n_train=64, bs=32, C=4, n_cells=2, arch_split="train")
    assert len(r["train"]) == 1 and len(r["val"]) == 1          # SkipValidation: the fit still records one epoch
