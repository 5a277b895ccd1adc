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


def conv_pair(kind: str, a: torch.Tensor):
    """The same network in two parametrizations: the conv under test fed z, or fed A z (a frozen 1x1 conv)
    with its weight W'_j = W_j A^-1 for every tap. kind: conv1d, convT1d, conv2d (stride 2, padding 1, no bias,
    as a ResNet's), convT2d."""
    torch.manual_seed(0)
    c = a.shape[0]
    two_d = kind.endswith("2d")
    conv, conv_t = (nn.Conv2d, nn.ConvTranspose2d) if two_d else (nn.Conv1d, nn.ConvTranspose1d)
    layer = {"conv1d": lambda: nn.Conv1d(c, 5, 3, padding=1), "convT1d": lambda: nn.ConvTranspose1d(c, 5, 4, 2, 1),
             "conv2d": lambda: nn.Conv2d(c, 5, 3, stride=2, padding=1, bias=False),
             "convT2d": lambda: nn.ConvTranspose2d(c, 5, 4, stride=2, padding=1)}[kind]()
    original = nn.Sequential(conv(3, c, 3, padding=1), nn.Tanh(), layer, nn.Tanh(), nn.Flatten(),
                             nn.LazyLinear(2)).double()
    original(torch.zeros((1, 3, 6, 6) if two_d else (1, 3, 8), dtype=torch.float64))  # materialize the lazy layer
    reparam = copy.deepcopy(original)
    w = reparam[2].weight.data
    a_inv = torch.linalg.inv(a)
    if kind.startswith("convT"):  # weight (C_in, C_out, *k): W'[:, o, j] = A^-T W[:, o, j]
        reparam[2].weight.data = torch.einsum("ij,jo...->io...", a_inv.T, w)
    else:  # weight (C_out, C_in, *k): W'_j = W_j A^-1
        reparam[2].weight.data = torch.einsum("oi...,ij->oj...", w, a_inv)
    mix = conv(c, c, 1, bias=False).double()
    mix.weight.data = a.reshape(c, c, *([1] * (2 if two_d else 1))).clone()
    mix.weight.requires_grad_(False)
    reparam = nn.Sequential(reparam[0], reparam[1], mix, *list(reparam)[2:])
    return original, reparam


@pytest.mark.parametrize("kind", ["conv1d", "convT1d", "conv2d", "convT2d"])
def test_conv_channel_mode_is_invariant_to_channel_mixing(kind):
    a = well_conditioned(4, 3)
    original, reparam = conv_pair(kind, a)
    g = torch.Generator().manual_seed(4)
    shape = (3, 6, 6) if kind.endswith("2d") else (3, 8)
    x = torch.randn(64, *shape, generator=g, dtype=torch.float64)
    y = torch.randn(64, 2, generator=g, dtype=torch.float64)
    fresh = torch.randn(32, *shape, generator=g, dtype=torch.float64)
    assert torch.allclose(original(fresh), reparam(fresh), atol=1e-10)
    make = lambda m: DoPr(m, lr=0.1, base="sgd", damping=0.0, damping_eps=0.0, conv_mode="channel")
    one_step(original, make, x, y)
    one_step(reparam, make, x, y)
    assert (original(fresh) - reparam(fresh)).abs().max().item() < 1e-8
    # plain SGD is not invariant here
    original, reparam = conv_pair(kind, a)
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


@pytest.mark.parametrize("fused", [True, False])
def test_dopr_adam_without_ap_is_adamw_bit_for_bit(fused):
    data = batches(10)
    kw = dict(lr=3e-3, betas=(0.95, 0.999), eps=1e-8, weight_decay=0.01)
    a, b = small_model(), small_model()
    opt = DoPr(a, ap=False, base="adam", fused=fused, **kw)
    train(a, opt, data)
    train(b, torch.optim.AdamW(b.parameters(), **({"fused": True} if fused else {"foreach": False}), **kw), data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert opt.param_groups[0]["fused"] is fused


def test_build_optimizer_uses_fused_adamw_where_the_device_has_it():
    model = small_model()
    assert build_optimizer(model, OptimConfig(name="adam")).param_groups[0]["fused"] is True
    assert build_optimizer(model, OptimConfig(name="dopr")).param_groups[0]["fused"] is True


@pytest.mark.parametrize("path", ["primal", "dual", "backward"])
def test_dopr_adam_is_adamw_on_the_ap_gradient(path):
    """Three DoPr-Adam steps equal torch's AdamW fed M = G S_d^-1 (by a direct float64 solve on each batch's
    S) for the Linear weights and G for everything else. Replaces "differs from AdamW by more than 1e-4",
    which any change to the AP gradient (a wrong damping, a transposed solve, S from the wrong layer) passed."""
    a = small_model().double()
    b = copy.deepcopy(a)
    kw = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt = DoPr(a, base="adam", damping=0.3, path=path, **kw)
    adamw = torch.optim.AdamW(b.parameters(), foreach=False, **kw)
    linears = [m for m in b if isinstance(m, nn.Linear)]
    inputs = {}
    for m in linears:
        m.register_forward_hook(lambda module, args, out: inputs.__setitem__(module, args[0].detach()))
    for x, y in batches(3):
        x, y = x.double(), y.double()
        opt.zero_grad()
        ((a(x) - y) ** 2).mean().backward()
        opt.step()
        adamw.zero_grad()
        ((b(x) - y) ** 2).mean().backward()
        for m in linears:
            z = inputs[m]
            s = z.T @ z / z.shape[0]
            s_d = s + (0.3 * s.trace() / s.shape[0] + 1e-8) * torch.eye(s.shape[0], dtype=s.dtype)
            m.weight.grad = torch.linalg.solve(s_d, m.weight.grad.T).T
        adamw.step()
    assert set(opt.last_paths.values()) == {path}
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-8, atol=1e-10)


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


@pytest.mark.parametrize("two_d", [False, True])
def test_muon_orthogonalizes_conv_weights_as_one_matrix(two_d):
    """Conv1d (6, 4, 3) as a (6, 12) matrix, Conv2d (6, 4, 3, 3) as (6, 36), never per output channel."""
    conv = nn.Conv2d(4, 6, 3, bias=False) if two_d else nn.Conv1d(4, 6, 3, bias=False)
    opt = DoPr(conv, lr=1.0, base="muon", ap=False, weight_decay=0.0, momentum=0.0, nesterov=False,
               adjust_lr="original", ns_steps=5)
    before = conv.weight.detach().clone()
    conv(torch.randn(8, 4, 10, 10) if two_d else torch.randn(8, 4, 10)).pow(2).sum().backward()
    opt.step()
    update = (before - conv.weight.detach()).reshape(6, -1)
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


def test_non_finite_activations_are_skipped_instead_of_poisoning_the_step():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    opt = DoPr(layer, lr=1e-2, base="sgd", path="primal")
    x = torch.randn(8, 3)
    layer(x).sum().backward()  # statistics from a clean batch ...
    opt._pending[opt.layers[0]].moment[0, 0] = float("inf")  # ... corrupted as an overflowing activation would
    opt.step()
    assert opt.health()["ap_skipped_stats"] == 1
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
    assert set(opt.last_paths.values()) == {"primal"}  # S is all-reduced, Z is not: only primal is exact
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
    distributed = torch.load(out)
    for path in ("primal", "dual", "backward"):  # one process, full batch, every exact path
        single = small_model()
        single.load_state_dict(state)
        opt = DoPr(single, lr=1e-2, base="adam", damping=0.1, path=path)
        for _ in range(3):
            opt.zero_grad()
            ((single(x) - y) ** 2).mean().backward()
            opt.step()
        # float32 rounding differs between the forms (Woodbury's G - G P cancels); Adam's normalization
        # magnifies it on near-zero gradient entries, hence the looser bound for the other paths
        atol = 1e-5 if path == "primal" else 1e-4
        for name, p in single.state_dict().items():
            assert torch.allclose(p, distributed[name], atol=atol), (path, name)


# ---- the exact cheaper paths against the naive solve -----------------------------------------------------
GAMMA = 0.3


def make_layer(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "linear":
        return nn.Linear(12, 5).double()
    if kind == "conv":
        return nn.Conv1d(6, 4, 3, padding=1, stride=2).double()
    if kind == "conv2d":  # a ResNet stem's shape: kernel 7, stride 2, padding 3
        return nn.Conv2d(6, 4, 7, padding=3, stride=2).double()
    if kind == "convT2d":
        return nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1).double()
    return nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1).double()


def layer_input(kind: str, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"linear": (batch, 12), "conv2d": (batch, 6, 3, 4), "convT2d": (batch, 6, 3, 4)}.get(kind, (batch, 6, 5))
    scale = torch.linspace(0.2, 3.0, shape[1], dtype=torch.float64)  # anisotropic inputs
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x * scale.reshape(-1, *[1] * (len(shape) - 2))
    return x.requires_grad_()


def layer_loss(layer, x, seed):
    out = layer(x)
    g = torch.Generator().manual_seed(100 + seed)
    return (torch.randn(out.shape, generator=g, dtype=out.dtype) * out).sum() + (out ** 2).sum()


def naive_ap(kind: str, layer: nn.Module, inputs: list[torch.Tensor]):
    """G S_d^-1 by a direct float64 solve, S over every call's rows; also the input gradients."""
    ref = copy.deepcopy(layer)
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    sum(layer_loss(ref, x, i) for i, x in enumerate(xs)).backward()
    rows = torch.cat([x.detach() if kind == "linear" else x.detach().movedim(1, -1).reshape(-1, 6) for x in xs])
    s = rows.T @ rows / rows.shape[0]
    s_d = s + (GAMMA * s.trace() / s.shape[0] + 1e-8) * torch.eye(s.shape[0], dtype=s.dtype)
    s_inv = torch.linalg.inv(s_d)
    g = ref.weight.grad
    if kind == "linear":
        m = g @ s_inv
    elif kind.startswith("conv") and not kind.startswith("convT"):  # (C_out, C_in, *k): M_j = G_j S^-1
        m = torch.einsum("oi...,ij->oj...", g, s_inv)
    else:  # (C_in, C_out, *k): M[:, o, j] = S^-1 G[:, o, j]
        m = torch.einsum("ij,jo...->io...", s_inv, g)
    return m, ref.bias.grad, [x.grad for x in xs], ref.weight.grad


def ap_step(kind: str, path: str, calls: int, pattern: str = "one_backward", **kw):
    """One AP-SGD step with lr 1: the weight moves by -M. Returns (M, bias step, input grads, DoPr)."""
    layer = make_layer(kind)
    before_w, before_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = DoPr(layer, lr=1.0, base="sgd", damping=GAMMA, path=path, **kw)
    xs = [layer_input(kind, 4 if kind == "linear" else 3, seed=i) for i in range(calls)]
    if pattern == "one_backward":  # several forward calls, one backward (shared layer, summed losses)
        sum(layer_loss(layer, x, i) for i, x in enumerate(xs)).backward()
    else:  # gradient accumulation: forward, backward, forward, backward, ... then one step
        for i, x in enumerate(xs):
            layer_loss(layer, x, i).backward()
    opt.step()
    return before_w - layer.weight.detach(), before_b - layer.bias.detach(), [x.grad for x in xs], opt, xs


@pytest.mark.parametrize("kind", ["linear", "conv", "convT", "conv2d", "convT2d"])
@pytest.mark.parametrize("path", ["primal", "dual", "backward"])
@pytest.mark.parametrize("calls, pattern", [(1, "one_backward"), (2, "one_backward"), (3, "accumulate")])
def test_every_ap_path_gives_the_naive_solve(kind, path, calls, pattern):
    m, b_step, x_grads, opt, xs = ap_step(kind, path, calls, pattern)
    m_ref, b_ref, x_grads_ref, _ = naive_ap(kind, make_layer(kind), xs)
    assert torch.allclose(m, m_ref, rtol=1e-9, atol=1e-10)
    assert torch.allclose(b_step, b_ref, rtol=1e-9, atol=1e-10)  # the bias gets the plain gradient
    for got, ref in zip(x_grads, x_grads_ref):
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-10)  # the layer still backpropagates D W
    used = opt.last_paths[""]
    if path == "backward" and calls > 1:
        assert used in ("primal", "dual")  # backward only for a layer called once before the step
    else:
        assert used == path


def test_auto_path_follows_the_flop_count():
    from dopr_robot.optim.dopr import ap_costs
    mlp_hidden = ap_costs(256, 512, 512, "linear")  # the default MLP's hidden layer at batch 256
    assert min(mlp_hidden, key=mlp_hidden.get) == "backward"
    wide_batch = ap_costs(4096, 64, 64, "linear")  # many rows, few inputs: primal
    assert min(wide_batch, key=wide_batch.get) == "primal"
    coarse_conv = ap_costs(256, 2048, 512 * 5)  # UNet coarse level, second call (no backward path): Woodbury
    assert min(coarse_conv, key=coarse_conv.get) == "dual"
    coarse_conv = ap_costs(256, 2048, 512 * 5, "conv", 256, 512)  # first call: whitened input in backward
    assert min(coarse_conv, key=coarse_conv.get) == "backward"
    layer = nn.Linear(512, 512)
    opt = DoPr(layer, base="sgd")
    layer(torch.randn(64, 512)).sum().backward()
    opt.step()
    assert opt.last_paths[""] == "backward"
    assert opt.health()["ap_layers_backward"] == 1


def test_auto_path_on_cpu_lets_a_wide_conv_skip_primal():
    conv = nn.Conv1d(1024, 64, 5, padding=2)  # a UNet coarse level: few rows, many input channels
    opt = DoPr(conv, base="sgd")
    conv(torch.randn(4, 1024, 4)).sum().backward()
    opt.step()
    assert opt.last_paths[""] != "primal"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_path_on_cuda_keeps_convs_on_primal_and_linears_on_the_flop_count():
    model = nn.Sequential(nn.Conv1d(1024, 64, 5, padding=2), nn.Flatten(), nn.Linear(256, 512),
                          nn.Linear(512, 512)).cuda()
    opt = DoPr(model, base="sgd")
    model(torch.randn(4, 1024, 4, device="cuda")).sum().backward()
    opt.step()
    assert opt.last_paths["0"] == "primal"
    assert opt.last_paths["3"] == "backward"  # 4 rows for 512 inputs: the flop count still decides


def test_bias_augment_linear_is_exact_on_primal_and_dual():
    steps = {}
    for path in ("primal", "dual", "backward"):
        layer = make_layer("linear")
        before = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
        opt = DoPr(layer, lr=1.0, base="sgd", damping=GAMMA, path=path, bias_augment=True)
        x = layer_input("linear", 4, 0)
        layer_loss(layer, x, 0).backward()
        opt.step()
        steps[path] = before - torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
        assert opt.last_paths[""] == ("primal" if path == "backward" else path)  # no augmented backward path
    ref = make_layer("linear")
    x = layer_input("linear", 4, 0)
    layer_loss(ref, x, 0).backward()
    z = torch.cat([x.detach(), torch.ones(4, 1, dtype=torch.float64)], 1)
    s = z.T @ z / 4
    s_d = s + (GAMMA * s.trace() / 13 + 1e-8) * torch.eye(13, dtype=torch.float64)
    m_ref = torch.cat([ref.weight.grad, ref.bias.grad[:, None]], 1) @ torch.linalg.inv(s_d)
    for path, step in steps.items():
        assert torch.allclose(step, m_ref, rtol=1e-9, atol=1e-10), path


@pytest.mark.parametrize("kw", [dict(ema_decay=0.5), dict(refresh_every=2), dict(stats_from="previous_batch")])
def test_only_primal_is_used_where_only_primal_is_exact(kw):
    """A forced dual or backward path falls back to primal where only primal is exact (the statistic is not
    this batch's own). (The paths' agreement where they are exact: test_every_ap_path_gives_the_naive_solve.)"""
    for path in ("dual", "backward"):
        model = small_model().double()
        opt = DoPr(model, lr=1e-2, base="adam", path=path, **kw)
        for x, y in batches(3):
            opt.zero_grad()
            ((model(x.double()) - y.double()) ** 2).mean().backward()
            opt.step()
            assert set(opt.last_paths.values()) == {"primal"}


def test_ema_statistic_is_the_running_average_that_preconditions_the_step():
    """Mutant killed: the EMA of statistics replaced by the per-batch S (ema_decay ignored)."""
    layer = make_layer("linear")
    opt = DoPr(layer, lr=1.0, base="sgd", damping=GAMMA, ema_decay=0.75)
    x1, x2 = layer_input("linear", 6, 0), layer_input("linear", 6, 1)
    layer_loss(layer, x1, 0).backward()
    opt.step()
    opt.zero_grad()
    before, ref = layer.weight.detach().clone(), copy.deepcopy(layer)
    layer_loss(layer, x2, 1).backward()
    opt.step()
    layer_loss(ref, x2, 1).backward()
    s1, s2 = (x.detach().T @ x.detach() / 6 for x in (x1, x2))
    s = 0.75 * s1 + 0.25 * s2
    assert torch.allclose(opt.state[layer.weight]["ap_stat"], s, atol=1e-12)
    s_d = s + (GAMMA * s.trace() / 12 + 1e-8) * torch.eye(12, dtype=torch.float64)
    assert torch.allclose(before - layer.weight.detach(), ref.weight.grad @ torch.linalg.inv(s_d), atol=1e-10)


def test_refresh_every_reuses_the_inverse_between_refreshes():
    """With refresh_every 2 the second step is preconditioned by the first step's S_d^-1 (mutant killed:
    refreshing every step), the third by the EMA refreshed again."""
    layer = make_layer("linear")
    opt = DoPr(layer, lr=1.0, base="sgd", damping=GAMMA, ema_decay=0.5, refresh_every=2)
    xs = [layer_input("linear", 6, i) for i in range(3)]
    moves, grads = [], []
    for i, x in enumerate(xs):
        opt.zero_grad()
        before = layer.weight.detach().clone()
        layer_loss(layer, x, i).backward()
        grads.append(layer.weight.grad.clone())
        opt.step()
        moves.append(before - layer.weight.detach())
    s1, s2, s3 = (x.detach().T @ x.detach() / 6 for x in xs)
    damped = lambda s: torch.linalg.inv(s + (GAMMA * s.trace() / 12 + 1e-8) * torch.eye(12, dtype=s.dtype))
    assert torch.allclose(moves[1], grads[1] @ damped(s1), atol=1e-10)
    assert torch.allclose(moves[2], grads[2] @ damped(0.25 * s1 + 0.25 * s2 + 0.5 * s3), atol=1e-10)


def test_previous_batch_statistics_precondition_the_next_gradient():
    layer = make_layer("linear")
    opt = DoPr(layer, lr=1.0, base="sgd", damping=GAMMA, stats_from="previous_batch")
    x1, x2 = layer_input("linear", 6, 0), layer_input("linear", 6, 1)
    layer_loss(layer, x1, 0).backward()
    opt.step()  # the first step has no previous batch: its own
    opt.zero_grad()
    before = layer.weight.detach().clone()
    ref = copy.deepcopy(layer)
    layer_loss(layer, x2, 1).backward()
    opt.step()
    layer_loss(ref, x2, 1).backward()
    s1 = x1.detach().T @ x1.detach() / 6
    s_d = s1 + (GAMMA * s1.trace() / 12 + 1e-8) * torch.eye(12, dtype=torch.float64)
    assert torch.allclose(before - layer.weight.detach(), ref.weight.grad @ torch.linalg.inv(s_d), atol=1e-10)


def clip_model(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 3)).double()
    if kind == "conv2d":  # ResNet-like: stride 2 with padding 1 and 3, no bias
        return nn.Sequential(nn.Conv2d(40, 16, 3, padding=1, stride=2, bias=False), nn.Tanh(),
                             nn.Conv2d(16, 8, 7, padding=3, stride=2, bias=False), nn.Tanh(),
                             nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1)).double()
    return nn.Sequential(nn.Conv1d(40, 16, 3, padding=1, stride=2), nn.Tanh(),
                         nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1), nn.Tanh(), nn.Conv1d(8, 3, 5, padding=2)
                         ).double()


@pytest.mark.parametrize("kind", ["linear", "conv", "conv2d"])
def test_clipping_sees_the_true_gradient_norm_on_the_backward_path(kind):
    from dopr_robot.optim import clip_grad_norm_

    def run(path, clip):
        model = clip_model(kind)
        model.load_state_dict(start)
        opt = DoPr(model, lr=1.0, base="sgd", damping=GAMMA, path=path)
        shape = {"linear": (8, 40), "conv": (2, 40, 6), "conv2d": (2, 40, 5, 6)}[kind]
        x, y = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 3.0
        ((model(x) - y) ** 2).sum().backward()
        norm = clip(opt, model)
        opt.step()
        return norm, [p.detach() for p in model.parameters()], opt

    start = clip_model(kind).state_dict()
    torch_clip = lambda opt, model: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    ours = lambda opt, model: clip_grad_norm_(opt, model.parameters(), 0.5)
    norm_ref, params_ref, _ = run("primal", torch_clip)  # .grad is G: torch's clip is the reference
    norm, params, opt = run("backward", ours)
    assert set(opt.last_paths.values()) == {"backward"}
    assert norm_ref > 5  # the clip is active
    assert torch.allclose(norm, norm_ref, rtol=1e-10)
    for a, b in zip(params, params_ref):
        assert torch.allclose(a, b, atol=1e-10)
    wrong, _, _ = run("backward", torch_clip)  # torch's clip would measure M, not G
    assert abs(wrong.item() - norm_ref.item()) > 1e-3


def test_ema_statistic_skips_a_non_finite_batch_and_keeps_preconditioning():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    opt = DoPr(layer, lr=1e-2, base="adam", ema_decay=0.9)
    for step in range(4):
        opt.zero_grad()
        layer(torch.randn(16, 3)).pow(2).sum().backward()
        if step == 1:
            opt._pending[opt.layers[0]].moment[1, 1] = float("nan")
            kept = opt.state[layer.weight]["ap_stat"].clone()
        opt.step()
        if step == 1:
            assert torch.equal(opt.state[layer.weight]["ap_stat"], kept)  # never entered the average
    health = opt.health()
    assert health["ap_skipped_stats"] == 1 and health["ap_fallbacks"] == 0
    assert torch.isfinite(opt.state[layer.weight]["ap_stat"]).all() and "ap_inverse" in opt.state[layer.weight]


def test_failed_factorization_waits_for_the_next_refresh():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = DoPr(model, lr=1e-2, base="adam", damping=0.0, damping_eps=0.0, refresh_every=3)
    calls = []
    original = torch.linalg.cholesky_ex
    torch.linalg.cholesky_ex = lambda a: calls.append(a.shape[-1]) or original(a)
    try:
        for _ in range(6):
            x = torch.randn(32, 4)
            x[:, 2] = 0.0  # the first layer's S is singular: Cholesky fails even at 10x (zero) damping
            opt.zero_grad()
            ((model(x) - 1.0) ** 2).mean().backward()
            opt.step()
    finally:
        torch.linalg.cholesky_ex = original
    assert opt.health()["ap_fallbacks"] == 2  # steps 0 and 3, not every step
    assert calls.count(4) == 4  # two tries (1x, 10x damping) at each of the two refreshes
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_matrix_layers_hidden_gives_io_layers_adam():
    from dopr_robot.config import PolicyConfig, UNetConfig
    from dopr_robot.policies import RangeNormalizer, build_policy

    ident = lambda d: RangeNormalizer(-torch.ones(d), torch.ones(d), 1.0)
    for backbone in ("mlp", "unet"):
        cfg = PolicyConfig(backbone=backbone, unet=UNetConfig(down_dims=[16, 32], n_groups=4, step_embed_dim=8))
        policy = build_policy(cfg, 5, 2, 2, 8, ident(5), ident(2))
        io = policy.io_layers()
        names = {m for m in policy.modules()}
        assert io and all(m in names and hasattr(m, "weight") for m in io)
        io_weights = {id(m.weight) for m in io}
        for name, expect_ap in (("muon", False), ("dopr-muon", True)):
            hidden = build_optimizer(policy, OptimConfig(name=name), io_layers=io)
            assert not io_weights & {id(p) for p in hidden.param_groups[0]["params"]}
            assert hidden.param_groups[0]["update"] == "muon" and hidden.param_groups[1]["update"] == "adam"
            assert io_weights <= {id(p) for p in hidden.param_groups[1]["params"]}
            ap_weights = {id(layer.weight) for layer in hidden.layers} if hidden.ap else set()
            assert (io_weights <= ap_weights) == expect_ap  # dopr-muon: AP then Adam on io layers
            hidden.remove_hooks()
            every = build_optimizer(policy, OptimConfig(name=name, matrix_layers="all"), io_layers=io)
            assert io_weights <= {id(p) for p in every.param_groups[0]["params"]}
            every.remove_hooks()


def test_bias_augment_on_channel_mode_convs_is_refused():
    from dopr_robot.config import load_config
    from dopr_robot.errors import UserError

    with pytest.raises(ValueError, match="bias_augment"):
        DoPr(nn.Conv1d(3, 4, 3), bias_augment=True, conv_mode="channel")
    DoPr(nn.Conv1d(3, 4, 3), bias_augment=True, conv_mode="full")  # defined there
    with pytest.raises(ValueError, match="bias_augment"):  # ConvTranspose1d has only the channel form
        DoPr(nn.ConvTranspose1d(3, 4, 3), bias_augment=True, conv_mode="full")
    with pytest.raises(UserError, match="bias_augment"):
        load_config(None, ["optim.name=dopr", "policy.backbone=unet", "optim.ap.bias_augment=true"])
    with pytest.raises(UserError, match="bias_augment"):
        load_config(None, ["optim.name=dopr", "policy.backbone=unet", "optim.ap.bias_augment=true",
                           "optim.ap.conv_mode=full"])
    load_config(None, ["optim.name=dopr", "optim.ap.bias_augment=true"])  # the MLP has no convs
    with pytest.raises(UserError, match="stats_from"):
        load_config(None, ["optim.ap.stats_from=next_batch"])


def test_ap_path_config_key_forces_the_path():
    """optim.ap.path reaches DoPr: a forced path is the one every layer takes (auto picks by flops)."""
    from dopr_robot.config import load_config
    from dopr_robot.errors import UserError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))  # batch 8 < d_in: auto avoids primal
    x = torch.randn(8, 32)
    for path in ("auto", "primal"):
        cfg = load_config(None, ["optim.name=dopr", f"optim.ap.path={path}"]).optim
        opt = build_optimizer(model, cfg)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        used = set(opt.last_paths.values())
        assert used == {"primal"} if path == "primal" else "primal" not in used
        opt.remove_hooks()
    with pytest.raises(UserError, match="optim.ap.path"):
        load_config(None, ["optim.ap.path=fastest"])


# ---- numerics at the small end of the damping grid (gamma_mean 0.01) --------------------------------------
def anisotropic_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """float32 inputs whose second moment has lambda_max / mean ~ 400, like the default MLP's hidden layers."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -4, d, dtype=torch.float64).sqrt()
    spectrum[0] = 20.0
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return ((torch.randn(n, d, generator=g, dtype=torch.float64) * spectrum) @ q.T + 0.3).float()


@pytest.mark.parametrize("bias_augment", [False, True])
@pytest.mark.parametrize("path", ["primal", "dual", "backward"])
def test_every_path_is_accurate_at_gamma_001_against_float64(path, bias_augment):
    """float32 layer, float64 reference from the same inputs. Fails on the float32 Woodbury (dual) path, whose
    G - (G Z^T) K^-1 Z cancels ~1/gamma of the digits (1e-2 relative error here)."""
    torch.manual_seed(1)
    n, d, d_out, gamma = 128, 256, 64, 0.01
    layer = nn.Linear(d, d_out)
    reference = copy.deepcopy(layer).double()
    x = anisotropic_rows(n, d, 0)
    upstream = torch.randn(n, d_out, generator=torch.Generator().manual_seed(5))
    before = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).double()
    opt = DoPr(layer, lr=1.0, base="sgd", damping=gamma, path=path, bias_augment=bias_augment)
    (layer(x) * upstream).sum().backward()
    opt.step()
    step = before - torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).double()
    (reference(x.double()) * upstream.double()).sum().backward()
    z, g = x.double(), reference.weight.grad
    if bias_augment:
        z = torch.cat([z, torch.ones(n, 1, dtype=torch.float64)], 1)
        g = torch.cat([g, reference.bias.grad[:, None]], 1)
    s = z.T @ z / n
    s_d = s + (gamma * s.trace() / s.shape[0] + 1e-8) * torch.eye(s.shape[0], dtype=torch.float64)
    m = torch.linalg.solve(s_d, g.T).T
    if not bias_augment:
        m = torch.cat([m, reference.bias.grad[:, None]], 1)
    assert (torch.linalg.eigvalsh(s)[-1] / s.trace() * s.shape[0]) > 100  # anisotropic enough to matter
    assert ((step - m).norm() / m.norm()).item() < 2e-3
    assert opt.last_paths[""] == ("primal" if path == "backward" and bias_augment else path)


def test_layers_ap_cannot_handle_are_counted_and_warned_about():
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2, padding=1), nn.Conv1d(4, 4, 3, padding="same"),
                          nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv1d(4, 4, 3, padding=1))
    with pytest.warns(UserWarning, match="3 conv layer"):
        opt = DoPr(model, base="adam")
    assert opt.health()["ap_layers_unsupported"] == 3
    assert [layer.name for layer in opt.layers] == ["3"]


def image_encoder():
    """A ResNet-like encoder made of standard layers: a 3-channel stem (7x7, stride 2, padding 3, no bias),
    GroupNorm, a 3x3 stride-2 conv, pooling and a Linear head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.GroupNorm(4, 16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def test_conv2d_encoder_groups_under_dopr_muon():
    """The stem (3 input channels) is an input layer: with matrix_layers hidden it gets AdamW, not Muon, and
    keeps AP; GroupNorm gains/shifts and biases get AdamW; the hidden conv gets Muon after AP."""
    model = image_encoder()
    stem, hidden_conv, head = model[0], model[3], model[8]
    opt = build_optimizer(model, OptimConfig(name="dopr-muon"), io_layers=[stem, head])
    muon_ids = {id(p) for p in opt.param_groups[0]["params"]}
    adam_ids = {id(p) for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["update"] == "muon" and muon_ids == {id(hidden_conv.weight)}
    norm_params = {id(p) for m in (model[1], model[4]) for p in m.parameters()}
    assert norm_params | {id(stem.weight), id(head.weight), id(head.bias)} == adam_ids
    assert {layer.name for layer in opt.layers} == {"0", "3", "8"}  # AP on every conv and the head
    x = torch.rand(4, 3, 20, 20)
    model(x).square().mean().backward()
    before = stem.weight.detach().clone()
    opt.step()
    assert set(opt.last_paths) == {"0", "3", "8"} and not torch.equal(before, stem.weight)
    assert opt.health()["ap_fallbacks"] == 0


def test_auto_path_covers_conv2d_by_flop_count():
    """A deep conv at low resolution (32 rows for 256 input channels) leaves primal; the stem (4096 rows for
    3 channels) stays there."""
    deep = nn.Conv2d(256, 64, 3, padding=1, bias=False)
    opt = DoPr(deep, base="sgd")
    deep(torch.randn(2, 256, 4, 4)).sum().backward()
    opt.step()
    assert opt.last_paths[""] == "backward"
    stem = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
    opt = DoPr(stem, base="sgd")
    stem(torch.randn(4, 3, 64, 64)).sum().backward()
    opt.step()
    assert opt.last_paths[""] == "primal"


# ---- Signum and DoPr-Signum ---------------------------------------------------------------------------------
def test_signum_step_by_hand():
    """m <- beta m + (1 - beta) g; W <- W (1 - lr wd) - lr sign(m), two steps, beside AdamW on the bias."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    bias_ref = copy.deepcopy(layer.bias)
    lr, wd, beta = 0.1, 0.5, 0.9
    opt = DoPr(layer, lr=lr, base="signum", ap=False, weight_decay=wd, momentum=beta)
    adam = torch.optim.AdamW([bias_ref], lr=lr, weight_decay=wd, foreach=False)
    w = layer.weight.detach().clone()
    m = torch.zeros_like(w)
    for x in (torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-3.0, 1.0, 0.25]])):
        opt.zero_grad()
        adam.zero_grad()
        (layer(x.double()) * torch.tensor([[1.0, -1.0]], dtype=torch.float64)).sum().backward()
        g = layer.weight.grad.clone()
        bias_ref.grad = layer.bias.grad.clone()
        opt.step()
        adam.step()
        m = beta * m + (1 - beta) * g
        w = w * (1 - lr * wd) - lr * torch.sign(m)
        assert torch.allclose(layer.weight, w, atol=1e-12)
        assert torch.allclose(layer.bias, bias_ref, atol=1e-12)  # not a matrix: AdamW
    assert opt.param_groups[0]["update"] == "signum" and opt.param_groups[1]["update"] == "adam"


def test_dopr_signum_takes_the_sign_of_the_ap_gradient_momentum():
    """AP composes with Signum as with the other bases: the momentum is of M = G S_d^-1, not of G."""
    layer = make_layer("linear")
    before = layer.weight.detach().clone()
    opt = DoPr(layer, lr=0.01, base="signum", damping=GAMMA, momentum=0.0, path="primal")
    x = layer_input("linear", 6, 0)
    layer_loss(layer, x, 0).backward()
    g = layer.weight.grad.clone()
    opt.step()
    z = x.detach()
    s = z.T @ z / 6
    m = g @ torch.linalg.inv(s + (GAMMA * s.trace() / 12 + 1e-8) * torch.eye(12, dtype=torch.float64))
    assert torch.equal((before - layer.weight.detach()).sign(), m.sign())
    assert not torch.equal(m.sign(), g.sign())  # so the test tells AP-then-sign from sign alone


def test_build_optimizer_signum_names():
    from dopr_robot.config import load_config

    model = small_model()
    for name, ap in (("signum", False), ("dopr-signum", True)):
        cfg = load_config(None, [f"optim.name={name}"]).optim
        opt = build_optimizer(model, cfg, io_layers=[model[0]])
        assert isinstance(opt, DoPr) and opt.ap is ap
        assert opt.param_groups[0]["update"] == "signum" and opt.param_groups[1]["update"] == "adam"
        assert len(opt.param_groups[0]["params"]) == 2  # the input layer (io) gets AdamW, as under muon
        opt.remove_hooks()


# ---- the step without host synchronization: same parameters as the spec's float64 step ---------------------
class MixedNet(nn.Module):
    """One layer of every kind AP handles: Conv2d (stride 2, padding 1, no bias), Conv1d, ConvTranspose1d, Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv2d = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False)
        self.conv1d = nn.Conv1d(6, 8, 3, padding=1)
        self.conv_t = nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1)
        self.linear = nn.Linear(24, 2)

    def forward(self, x):
        h = torch.tanh(self.conv2d(x)).mean(2)  # (B, 6, 3)
        h = torch.tanh(self.conv_t(torch.tanh(self.conv1d(h))))  # (B, 4, 6)
        return self.linear(h.flatten(1))


def mixed_batches(kind: str, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(4, 3, 6, 6, generator=g, dtype=dtype) for _ in range(3)]
    if kind == "non_finite":  # a finite input whose second moment overflows: S is inf, G is finite
        xs[1][0, 0, 0, 0] = 10 * torch.finfo(dtype).max ** 0.5
    if kind == "singular":
        for x in xs:
            x[:, 1] = 0.0  # the stem's S has a zero row: undamped Cholesky fails at 1x and 10x
    return [(x, torch.randn(4, 2, generator=g, dtype=dtype)) for x in xs]


def reference_dopr_adam(model, batches, gamma, eps, path, lr, wd):
    """DoPr-Adam as the spec states it, in float64, with host-side control flow: per-batch channel S, damping
    gamma tr(S)/d + eps, Cholesky retried at 10x, else M = G; a non-finite S is skipped (the primal path keeps
    the last inverse, dual and backward use M = G)."""
    model = copy.deepcopy(model)
    layers = [model.conv2d, model.conv1d, model.conv_t, model.linear]
    adam = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, foreach=False)
    inputs, last_inverse = {}, {}
    for m in layers:
        m.register_forward_hook(lambda module, args, out: inputs.__setitem__(module, args[0].detach()))
    for x, y in batches:
        adam.zero_grad()
        (model(x) * y).sum().backward()  # linear in the output: an overflowing input leaves G finite
        for m in layers:
            z = inputs[m]
            rows = z if isinstance(m, nn.Linear) else z.movedim(1, -1).reshape(-1, z.shape[1])
            s = rows.T @ rows / rows.shape[0]
            inverse = last_inverse.get(m) if path == "primal" else None
            if torch.isfinite(s).all():
                inverse = None
                lam = gamma * s.trace() / s.shape[0] + eps
                for attempt in (lam, 10 * lam):
                    factor, info = torch.linalg.cholesky_ex(s + attempt * torch.eye(s.shape[0], dtype=s.dtype))
                    if info.item() == 0:
                        inverse = torch.cholesky_inverse(factor)
                        break
                last_inverse[m] = inverse
            if inverse is not None and isinstance(m, nn.ConvTranspose1d):
                m.weight.grad = torch.einsum("ij,jo...->io...", inverse, m.weight.grad)
            elif inverse is not None:
                m.weight.grad = torch.einsum("oi...,ij->oj...", m.weight.grad, inverse)
        adam.step()
    return model


@pytest.mark.parametrize("kind, path", [("clean", "auto"), ("clean", "primal"), ("clean", "dual"),
                                        ("clean", "backward"), ("non_finite", "primal"), ("non_finite", "dual"),
                                        ("non_finite", "backward"), ("singular", "auto")])
@pytest.mark.parametrize("stalls", [True, False], ids=["as-on-accelerator", "cpu"])
def test_step_matches_a_float64_reference_on_every_layer_kind(monkeypatch, kind, path, stalls):
    """The device-side step (no .item(), masked fallbacks, batched factorizations) against the spec's step
    with Python control flow, on Linear, Conv1d, ConvTranspose1d and Conv2d: clean batches on every path, a
    batch whose S overflows (skipped, counted), and singular statistics at zero damping (factorization fails
    at 1x and 10x, M = G, counted). Both ways of deciding the retry (`host_reads_stall`) give that step."""
    from dopr_robot.optim import dopr

    monkeypatch.setattr(dopr, "host_reads_stall", lambda device: stalls)
    gamma, eps = (0.0, 0.0) if kind == "singular" else (0.1, 1e-8)
    model = MixedNet().double()
    reference = reference_dopr_adam(model, mixed_batches(kind), gamma, eps, path, lr=1e-2, wd=0.1)
    opt = DoPr(model, lr=1e-2, base="adam", damping=gamma, damping_eps=eps, path=path, weight_decay=0.1,
               betas=(0.9, 0.999))
    for x, y in mixed_batches(kind):
        opt.zero_grad()
        (model(x) * y).sum().backward()
        opt.step()
        assert set(opt.last_paths.values()) == ({"primal"} if kind == "singular" or path == "primal" else
                                                {path} if path != "auto" else {"primal", "backward"})
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), name
    health = opt.health()
    assert health["ap_skipped_stats"] == (1 if kind == "non_finite" else 0)  # the stem, once
    # singular: the stem (a zero channel) and the Linear (4 rows for 24 inputs), at each of 3 steps
    assert health["ap_fallbacks"] == (6 if kind == "singular" else 0)


def test_a_training_step_never_synchronizes_with_the_host(monkeypatch):
    """No .item() / bool(tensor) / data-dependent shape anywhere in forward, backward, clipping and step where a
    host read would stall an accelerator's queue: every host synchronization goes through
    aten._local_scalar_dense (CPU included), and none is dispatched when the optimizer runs as on an accelerator
    (`host_reads_stall` True; on the CPU it may read whether a factorization failed, tested below). Fails on
    the step that read the damping, Cholesky's info and the finiteness check with .item() (8 per step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dopr_robot.optim import clip_grad_norm_, dopr

    monkeypatch.setattr(dopr, "host_reads_stall", lambda device: True)

    class CountSyncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountSyncs.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    for path in ("auto", "primal", "dual", "backward"):
        for base in ("adam", "muon", "signum"):
            model = MixedNet()
            opt = DoPr(model, base=base, path=path, damping=0.1)
            for x, y in mixed_batches("clean", torch.float32):  # (fallbacks are masks: the same ops run)
                with CountSyncs():
                    opt.zero_grad()
                    (model(x) * y).sum().backward()
                    clip_grad_norm_(opt, model.parameters(), 1.0)
                    opt.step()
            assert CountSyncs.count == 0, (path, base)
            assert path == "auto" or set(opt.last_paths.values()) == {path}


# ---- the trainer's side: AP reaches the weights, clipping sees the true gradient ----------------------------
@pytest.fixture(scope="module")
def tiny_h5(tmp_path_factory):
    from tiny_data import write_tiny_hdf5

    return write_tiny_hdf5(tmp_path_factory.mktemp("data") / "tiny.hdf5")


def test_trainer_applies_ap_and_clips_on_the_true_gradient(tiny_h5, tmp_path):
    """Three short trainer runs, same seed: DoPr-Adam on the primal path (.grad holds G, so any clip measures
    ||G||), on the backward path (.grad holds M) and AdamW, with an active clip. Mutants killed: the trainer
    calling torch.nn.utils.clip_grad_norm_ (it measures ||M|| on the backward path: the logged norms and the
    weights part), and AP skipped (DoPr-Adam without AP is fused AdamW bit for bit)."""
    import json

    from dopr_robot.config import load_config
    from dopr_robot.training import train
    from tiny_data import TINY_TRAIN

    def run(name, *extra):
        cfg = load_config(None, [f"data.path={tiny_h5}", *TINY_TRAIN, "train.steps=3", "train.grad_clip=0.05",
                                 "train.val_every=3", *extra])
        out = train(cfg, tmp_path / name, progress=False)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return records, torch.load(out / "trainer_state.pt", weights_only=False)["policy"]

    primal, w_primal = run("primal", "optim.name=dopr", "optim.ap.path=primal")
    backward, w_backward = run("backward", "optim.name=dopr", "optim.ap.path=backward")
    _, w_adam = run("adam", "optim.name=adam")
    assert backward[-1]["ap_layers_backward"] > 0 and backward[-1]["ap_layers_primal"] == 0
    assert all(r["grad_norm"] > 0.5 for r in primal)  # the clip (0.05) is active
    for a, b in zip(primal, backward):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    gap = max((w_primal[k] - w_backward[k]).abs().max().item() for k in w_primal)
    ap_effect = max((w_primal[k] - w_adam[k]).abs().max().item() for k in w_primal)
    assert gap < 1e-5 < ap_effect / 100


@pytest.mark.parametrize("stalls", [True, False])
def test_damped_inverses_retry_at_10x_then_identity(monkeypatch, stalls):
    """One batched call: a positive definite matrix is inverted at lambda; one that fails at lambda but not at
    10 lambda is retried there; one that fails at both gives the identity (M = G); a second failure in the
    same batch and step falls back at once (one retry slot per batch); the inputs are left as they were. The
    same with the retry always made (as on an accelerator) and made only after a failure (the CPU's way)."""
    from dopr_robot.optim import dopr
    from dopr_robot.optim.dopr import damped_inverses

    monkeypatch.setattr(dopr, "host_reads_stall", lambda device: stalls)

    spd = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    retryable = torch.tensor([[1.0, 0.0], [0.0, -1e-3]], dtype=torch.float64)  # fails at 5e-4, not at 5e-3
    hopeless = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    matrices = torch.stack([spd, retryable, hopeless, retryable])
    before = matrices.clone()
    lam = torch.full((4,), 5e-4, dtype=torch.float64)
    inverses, ok, retried = damped_inverses(matrices, lam)
    eye = torch.eye(2, dtype=torch.float64)
    assert torch.allclose(inverses[0], torch.linalg.inv(spd + 5e-4 * eye))
    assert torch.allclose(inverses[1], torch.linalg.inv(retryable + 5e-3 * eye))
    assert torch.equal(inverses[2], eye) and torch.equal(inverses[3], eye)
    assert ok.tolist() == [True, True, False, False] and retried.tolist() == [False, True, False, False]
    assert torch.equal(matrices, before)
