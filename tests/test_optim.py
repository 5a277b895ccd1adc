"""DoPr and Muon: the properties that define them, each able to fail."""

import copy
import os

import pytest
import torch
from torch import nn

from dopr_robot.optim import DoPr, OptimConfig, build_optimizer


def fixed_linear(a: torch.Tensor) -> nn.Linear:
    """z -> A z as a frozen layer (no parameters for any optimizer)."""
    layer = nn.Linear(a.shape[1], a.shape[0], bias=False).double()
    layer.weight.data.copy_(a)
    layer.weight.requires_grad_(False)
    return layer


def well_conditioned(d: int, seed: int) -> torch.Tensor:
    """Q1 diag(0.5 .. 3) Q2: invertible, far from orthogonal, condition number 6."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q1 @ torch.diag(torch.linspace(0.5, 3.0, d, dtype=torch.float64)) @ q2


def one_step(model, make_opt, x, y):
    opt = make_opt(model)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return model


def mlp_pair(a: torch.Tensor):
    """The same function in two parametrizations: hidden layer fed z, or fed A z with W' = W A^-1."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    reparam = copy.deepcopy(original)
    hidden = reparam[2]
    hidden.weight.data = hidden.weight.data @ torch.linalg.inv(a)
    reparam = nn.Sequential(reparam[0], reparam[1], fixed_linear(a), hidden, reparam[3], reparam[4])
    return original, reparam


@pytest.mark.parametrize("optimizer, invariant", [
    (lambda m: DoPr(m, lr=0.1, base="sgd", damping=0.0, damping_eps=0.0), True),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), False),
    (lambda m: torch.optim.Adam(m.parameters(), lr=0.01), False),
])
def test_ap_sgd_step_is_invariant_to_linear_reparametrization(optimizer, invariant):
    a = well_conditioned(16, 1)
    original, reparam = mlp_pair(a)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(512, 6, generator=g, dtype=torch.float64), torch.randn(512, 3, generator=g, dtype=torch.float64)
    fresh = torch.randn(256, 6, generator=g, dtype=torch.float64)
    assert torch.allclose(original(fresh), reparam(fresh), atol=1e-10)  # same function before the step
    one_step(original, optimizer, x, y)
    one_step(reparam, optimizer, x, y)
    gap = (original(fresh) - reparam(fresh)).abs().max().item()
    moved = (original(fresh) - mlp_pair(a)[0](fresh)).abs().max().item()
    assert moved > 1e-3  # the step did something
    if invariant:
        assert gap < 1e-8
    else:
        assert gap > 1e-4


def conv_pair(transpose: bool, a: torch.Tensor):
    torch.manual_seed(0)
    c = a.shape[0]
    layer = nn.ConvTranspose1d(c, 5, 4, stride=2, padding=1) if transpose else nn.Conv1d(c, 5, 3, padding=1)
    original = nn.Sequential(nn.Conv1d(3, c, 3, padding=1), nn.Tanh(), layer, nn.Tanh(), nn.Flatten(),
                             nn.LazyLinear(2)).double()
    original(torch.zeros(1, 3, 8, dtype=torch.float64))  # materialize the lazy layer
    reparam = copy.deepcopy(original)
    w = reparam[2].weight.data
    a_inv = torch.linalg.inv(a)
    if transpose:  # weight (C_in, C_out, k): W'[:, o, j] = A^-T W[:, o, j]
        reparam[2].weight.data = torch.einsum("ij,jok->iok", a_inv.T, w)
    else:  # weight (C_out, C_in, k): W'_j = W_j A^-1
        reparam[2].weight.data = torch.einsum("oik,ij->ojk", w, a_inv)
    mix = nn.Conv1d(c, c, 1, bias=False).double()
    mix.weight.data = a[:, :, None].clone()
    mix.weight.requires_grad_(False)
    reparam = nn.Sequential(reparam[0], reparam[1], mix, *list(reparam)[2:])
    return original, reparam


@pytest.mark.parametrize("transpose", [False, True])
def test_conv_channel_mode_is_invariant_to_channel_mixing(transpose):
    a = well_conditioned(4, 3)
    original, reparam = conv_pair(transpose, a)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 3, 8, generator=g, dtype=torch.float64), torch.randn(64, 2, generator=g, dtype=torch.float64)
    fresh = torch.randn(32, 3, 8, generator=g, dtype=torch.float64)
    assert torch.allclose(original(fresh), reparam(fresh), atol=1e-10)
    make = lambda m: DoPr(m, lr=0.1, base="sgd", damping=0.0, damping_eps=0.0, conv_mode="channel")
    one_step(original, make, x, y)
    one_step(reparam, make, x, y)
    assert (original(fresh) - reparam(fresh)).abs().max().item() < 1e-8
    # plain SGD is not invariant here
    original, reparam = conv_pair(transpose, a)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)
    one_step(original, sgd, x, y)
    one_step(reparam, sgd, x, y)
    assert (original(fresh) - reparam(fresh)).abs().max().item() > 1e-4


def unfold_by_hand(x, k, stride, padding, dilation):
    """(B, C, L) -> (B * L_out, C * k) patches, ordered (channel, tap) like weight.reshape(C_out, C_in * k)."""
    B, C, L = x.shape
    xp = torch.nn.functional.pad(x, (padding, padding))
    L_out = (L + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    rows = []
    for b in range(B):
        for t in range(L_out):
            rows.append(torch.stack([xp[b, c, t * stride + j * dilation] for c in range(C) for j in range(k)]))
    return torch.stack(rows), L_out


@pytest.mark.parametrize("bias_augment", [False, True])
def test_conv_full_mode_equals_linear_on_unfolded_input(bias_augment):
    torch.manual_seed(0)
    k, stride, padding, dilation = 3, 2, 2, 2
    conv = nn.Conv1d(3, 5, k, stride=stride, padding=padding, dilation=dilation).double()
    linear = nn.Linear(3 * k, 5).double()
    linear.weight.data = conv.weight.data.reshape(5, -1).clone()
    linear.bias.data = conv.bias.data.clone()
    x = torch.randn(16, 3, 11, dtype=torch.float64)
    patches, L_out = unfold_by_hand(x, k, stride, padding, dilation)
    target = torch.randn(16, 5, L_out, dtype=torch.float64)
    opt_c = DoPr(conv, lr=0.05, base="sgd", damping=0.1, conv_mode="full", bias_augment=bias_augment)
    opt_l = DoPr(linear, lr=0.05, base="sgd", damping=0.1, bias_augment=bias_augment)
    out_c = conv(x)
    out_l = linear(patches).reshape(16, L_out, 5).transpose(1, 2)
    assert torch.allclose(out_c, out_l, atol=1e-12)
    ((out_c - target) ** 2).sum().backward()
    ((out_l - target) ** 2).sum().backward()
    opt_c.step()
    opt_l.step()
    assert torch.allclose(opt_c.state[conv.weight]["ap_stat"], opt_l.state[linear.weight]["ap_stat"], atol=1e-12)
    assert torch.allclose(conv.weight.reshape(5, -1), linear.weight, atol=1e-10)
    assert torch.allclose(conv.bias, linear.bias, atol=1e-10)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 32), nn.LayerNorm(32), nn.Mish(), nn.Linear(32, 32), nn.Mish(), nn.Linear(32, 3))


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 5, generator=g), torch.randn(64, 3, generator=g)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model


def test_dopr_adam_without_ap_is_adamw_bit_for_bit():
    data = batches(10)
    kw = dict(lr=3e-3, betas=(0.95, 0.999), eps=1e-8, weight_decay=0.01)
    a, b = small_model(), small_model()
    train(a, DoPr(a, ap=False, base="adam", **kw), data)
    train(b, torch.optim.AdamW(b.parameters(), foreach=False, **kw), data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_dopr_adam_with_ap_differs_from_adamw():
    data = batches(3)
    a, b = small_model(), small_model()
    train(a, DoPr(a, lr=3e-3, base="adam"), data)
    train(b, torch.optim.AdamW(b.parameters(), lr=3e-3, weight_decay=0.0), data)
    assert max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters())) > 1e-4


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_our_muon_equals_torch_muon_on_matrices(adjust):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(5, 32, bias=False), nn.Tanh(), nn.Linear(32, 3, bias=False))
    a = make()
    b = copy.deepcopy(a)
    data = batches(10)
    train(a, DoPr(a, lr=0.02, base="muon", ap=False, weight_decay=0.1, momentum=0.9, adjust_lr=adjust), data)
    train(b, torch.optim.Muon(b.parameters(), lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn=adjust), data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_muon_orthogonalizes_conv_weights_as_one_matrix():
    conv = nn.Conv1d(4, 6, 3, bias=False)
    opt = DoPr(conv, lr=1.0, base="muon", ap=False, weight_decay=0.0, momentum=0.0, nesterov=False,
               adjust_lr="original", ns_steps=5)
    before = conv.weight.detach().clone()
    conv(torch.randn(8, 4, 10)).pow(2).sum().backward()
    opt.step()
    update = (before - conv.weight.detach()).reshape(6, 12)
    # One orthogonalized (6 x 12) matrix has ~unit singular values; per-output-channel orthogonalization of
    # (4 x 3) slices would give 6 x 3 = 18 singular values spread differently, and its rows would not be
    # mutually orthogonal.
    sv = torch.linalg.svdvals(update)
    assert sv.min() > 0.5 and sv.max() < 1.5
    gram = update @ update.T
    off_diagonal = gram - torch.diag(torch.diag(gram))
    assert off_diagonal.abs().max() < 0.35


def test_hooks_gather_nothing_without_grad_or_in_eval_mode():
    model = small_model()
    opt = DoPr(model)
    with torch.no_grad():
        model(torch.randn(4, 5))
    model.eval()
    model(torch.randn(4, 5))
    ema_copy = copy.deepcopy(model).train()
    ema_copy(torch.randn(4, 5))
    assert opt._pending == {}
    model.train()
    model(torch.randn(4, 5))
    assert len(opt._pending) == 3


def test_repeated_calls_accumulate_weighted_by_rows():
    layer = nn.Linear(3, 2, bias=False).double()
    opt = DoPr(layer, lr=0.0, base="sgd")
    x1, x2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    (layer(x1).sum() + layer(x2).sum()).backward()
    opt.step()
    x = torch.cat([x1, x2])
    assert torch.allclose(opt.state[layer.weight]["ap_stat"], x.T @ x / 12)
    assert opt._pending == {}


def test_cholesky_failure_falls_back_and_training_continues():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = DoPr(model, lr=1e-2, base="adam", damping=0.0, damping_eps=0.0)
    for _ in range(5):
        x = torch.randn(32, 4)
        x[:, 2] = 0.0  # the first layer's S is singular: exact zero pivot, so Cholesky fails even at 10x damping
        opt.zero_grad()
        ((model(x) - 1.0) ** 2).mean().backward()
        opt.step()
    health = opt.health()
    assert health["ap_fallbacks"] == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_round_trip_gives_identical_continuation():
    data = batches(12, seed=5)
    kw = dict(lr=3e-3, base="muon", ema_decay=0.5, refresh_every=2, bias_augment=True)
    model = small_model()
    opt = DoPr(model, **kw)
    train(model, opt, data[:5])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, data[5:])

    resumed = small_model()
    resumed.load_state_dict(saved_model)
    opt2 = DoPr(resumed, **kw)
    opt2.load_state_dict(saved_opt)
    assert opt2.steps == 5
    train(resumed, opt2, data[5:])
    for pa, pb in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)


def test_build_optimizer_names():
    model = small_model()
    assert isinstance(build_optimizer(model, OptimConfig(name="adam")), torch.optim.AdamW)
    muon = build_optimizer(model, OptimConfig(name="muon"))
    assert isinstance(muon, DoPr) and not muon.ap and muon.param_groups[0]["update"] == "muon"
    dopr = build_optimizer(model, OptimConfig(name="dopr"))
    assert dopr.ap and dopr.param_groups[0]["update"] == "adam"
    dopr_muon = build_optimizer(model, OptimConfig(name="dopr-muon"))
    assert dopr_muon.ap and dopr_muon.param_groups[0]["update"] == "muon"
    # matrix weights get the base GP, everything else (biases, LayerNorm) AdamW
    assert len(dopr_muon.param_groups[0]["params"]) == 3
    assert dopr_muon.param_groups[1]["update"] == "adam"


def test_non_finite_activations_fall_back_instead_of_poisoning_the_step():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    opt = DoPr(layer, lr=1e-2, base="sgd")
    x = torch.randn(8, 3)
    layer(x).sum().backward()  # statistics from a clean batch ...
    opt._pending[opt.layers[0]][0][0, 0] = float("inf")  # ... corrupted as an overflowing activation would
    opt.step()
    assert opt.health()["ap_fallbacks"] == 1
    assert torch.isfinite(layer.weight).all()


def _ddp_worker(rank, world, init_file, x, y, state, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = small_model()
    model.load_state_dict(state)
    ddp = DistributedDataParallel(model)
    opt = DoPr(ddp, lr=1e-2, base="adam", damping=0.1)
    half = x.shape[0] // world
    for _ in range(3):
        opt.zero_grad()
        ((ddp(x[rank * half:(rank + 1) * half]) - y[rank * half:(rank + 1) * half]) ** 2).mean().backward()
        opt.step()
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown: under CPU load a gloo thread still joinable at static destruction sometimes
    # aborts the process ("terminate called without an active exception") after all work is done.
    os._exit(0)


def test_ddp_all_reduces_statistics_to_the_full_batch_step(tmp_path):
    """Two gloo ranks with half a batch each take the step one process takes with the whole batch."""
    import torch.multiprocessing as tmp

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, 3, generator=g)
    state = small_model().state_dict()
    out = tmp_path / "rank0.pt"
    tmp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), x, y, state, str(out)), nprocs=2, join=True)
    single = small_model()
    single.load_state_dict(state)
    opt = DoPr(single, lr=1e-2, base="adam", damping=0.1)
    for _ in range(3):
        opt.zero_grad()
        ((single(x) - y) ** 2).mean().backward()
        opt.step()
    distributed = torch.load(out)
    for name, p in single.state_dict().items():
        assert torch.allclose(p, distributed[name], atol=1e-5), name
