r"""DoPr: double preconditioning = activation-wise preconditioning (AP) composed with a gradient
preconditioner (GP: AdamW, Muon or Signum). Zhang, Shah, Zhang, Zhang, Matni, Simchowitz, arXiv 2606.06418 (2026).

For a weight W (d_out x d_in) of a layer that sees inputs z (rows of Z, n x d_in), output gradient D (n x d_out)
and weight gradient G = D^T Z:

    S   = Z^T Z / n                              uncentered second moment of the layer input (>= float32)
    S_d = S + lambda I,  lambda = gamma tr(S) / d_in + eps   ("mean" form; "trace": gamma tr(S) + eps)
    M   = G S_d^{-1}                             the AP gradient (10x damping if the factorization fails,
                                                 then M = G; both counted)
    W  <- GP(M)                                  AdamW moments of M, or Muon: Nesterov momentum on M,
                                                 Newton-Schulz orthogonalization, shape-dependent lr scale,
                                                 or Signum: m <- beta m + (1 - beta) M, W <- W - lr sign(m)

Why: with z' = A z and W' = W A^{-1} (the same network), G' = G A^T and S' = A S A^T, so M' = M A^{-1} and an
AP-SGD step moves the network function identically in both parametrizations.

Three exact ways to compute the same M (chosen by flop count in `ap_costs`/`choose_path`, once per layer shape;
on a GPU, conv layers always take primal, see `choose_path`):

    primal    M = G S_d^{-1}: Cholesky of S_d, cholesky_inverse, one GEMM.
    dual      Woodbury, with c = n lambda and K = Z Z^T + c I (n x n):  S_d^{-1} = n (I - Z^T K^{-1} Z) / c, so
              M = (n / c) (G - (G Z^T) K^{-1} Z). Cheaper when a layer sees fewer rows than it has inputs.
              In float64: G - (G Z^T) K^{-1} Z cancels ~1/gamma of the digits (1e-2 error in float32 at 0.01).
    backward  M = D^T Zw with the whitened input Zw = Z S_d^{-1} = n K^{-1} Z (push-through identity), or
              M = n (K^{-1} D)^T Z for a Linear with d_out < d_in, computed inside backward: the layer's weight
              gradient *is* M and G is never formed. For a conv in channel mode every tap reads shifted rows
              of the same Z, so M_j = G_j S_d^{-1} = D^T (Zw)_j: the conv's weight gradient for input Zw.

dual and backward need S from this very batch, so with ema_decay > 0, refresh_every > 1, stats_from =
"previous_batch" or under torch.distributed (S is all-reduced, Z is not) only primal is exact and is used.
Gradient clipping must see ||G||, not ||M||: `clip_grad_norm_` measures a backward-path layer by
||D^T Z||_F^2 = <D D^T, Z Z^T> (for a conv summed over taps on the rows each tap pairs) and scales its M by the
clip coefficient, which is exact because M is linear in D.

Layers: Linear; Conv1d, Conv2d, ConvTranspose1d and ConvTranspose2d in "channel" mode (S over input channels,
averaged over the batch and *every* input position, one S^{-1} for every kernel tap: M_j = G_j S_d^{-1}, the
invariant form under channel-mixing maps; for a strided conv that includes positions the kernel never reads,
e.g. the odd rows and columns a 1x1 stride-2 conv skips, which transforms as A S A^T all the same) or, for
Conv1d only, "full" mode (S over unfolded patches of C_in * k, KFC-style; Conv2d stays in channel mode).
Transposed conv weights are (C_in, C_out, *k), so there M[:, o, j] = S_d^{-1} G[:, o, j]. Grouped,
non-zero-padded and padding='same' convs (and 3-d ones) get AdamW, with a warning and a count in health().
All other parameters (biases, norm gains, ...) and the weights of `adam_layers` get AdamW (torch's fused
kernel where the device has one); with bias_augment a Linear (or full-mode Conv1d) bias is preconditioned
jointly with its weight through a constant-1 input.

Statistics come from forward hooks, only in training mode with grad enabled; several calls before one step
accumulate weighted by rows; under torch.distributed they are all-reduced before the solve. A non-finite
statistic is skipped (counted) and never enters the running average; a failed factorization is retried only
at the next refresh.

step() never synchronizes with an accelerator (no .item(), no data-dependent branch or shape), so a GPU's queue
never stalls on it: lambda stays a device tensor; the layers whose matrices have equal size are factored in one
batched Cholesky call, then the first of them that failed (if any) once more at 10x damping (one retry slot
per group and step: see `damped_inverses`), and torch.where keeps what succeeded, else the identity (M = G);
a non-finite statistic is masked out of the average; the counters are device tensors read only by health().
The one host read is on the CPU, where it stalls nothing (`host_reads_stall`): whether to make the retry call.
The backward path factors all its layers at the first backward of a step (Z is known by then).

With ap=False, base="adam" is AdamW, base="muon" is Muon for every matrix and conv
weight (reshaped to (C_out, C_in * k), never refused, never orthogonalized per output channel) and
base="signum" is Signum (all with decoupled weight decay).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.adamw import adamw as functional_adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
PATHS = ("primal", "dual", "backward")
BASES = ("adam", "muon", "signum", "sgd")
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)  # other convs: AdamW, warned


# ---- the damped solve, three ways ------------------------------------------------------------------------
def damping(trace: torch.Tensor, d: int, gamma: float, form: str, eps: float) -> torch.Tensor:
    """lambda of S_d = S + lambda I from tr(S), as a tensor on S's device (non-finite when S is)."""
    return gamma * (trace / d if form == "mean" else trace) + eps


def host_reads_stall(device: torch.device) -> bool:
    """Whether reading a tensor back to the host waits on a queue of kernels (an accelerator), so that step()
    must not branch on data. On the CPU every op has already run when it returns: a read costs nothing."""
    return device.type != "cpu"


def damped_inverses(matrices: torch.Tensor, lam: torch.Tensor, usable: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_b + lam_b I)^{-1} for a batch of equal-size symmetric matrices (B, m, m) by Cholesky, one batched
    call, without reading anything back to the host where that would stall a queue (their diagonal is scratch
    space, restored on return). Where it fails, the first failed matrix of the batch is factored again at
    10 lam (one retry slot per batch and step: a second retry call for the whole batch would double the
    factorization cost, and two same-size layers failing in one step is rarer still: the second then falls
    back at once). Where no attempt succeeded, lam is not finite or `usable` is False, the result is the
    identity, i.e. M = G. On an accelerator the retry call always runs (whether anything failed is not known
    on the host); on the CPU it runs only when a factorization failed, with the same result.
    Returns (inverses, ok (B,) bool: a real inverse, retried (B,) bool: ok at 10x)."""
    diagonal = matrices.diagonal(dim1=-2, dim2=-1)
    saved = diagonal.clone()
    diagonal.add_(lam[:, None])
    factor, info = torch.linalg.cholesky_ex(matrices)
    diagonal.copy_(saved)
    usable = torch.isfinite(lam) if usable is None else torch.isfinite(lam) & usable
    first = info == 0
    failed = usable & ~first
    retried = torch.zeros_like(first)
    if host_reads_stall(matrices.device) or bool(failed.any()):
        slot = torch.argmax(failed.to(torch.int8)).reshape(1)  # the first failure (0 if none)
        retry = matrices.index_select(0, slot)
        retry.diagonal(dim1=-2, dim2=-1).add_(10 * lam.index_select(0, slot)[:, None])
        retry_factor, retry_info = torch.linalg.cholesky_ex(retry)
        retried = (torch.arange(len(lam), device=lam.device) == slot) & ~first & (retry_info == 0)
        factor.index_copy_(0, slot, torch.where(retried.index_select(0, slot)[:, None, None], retry_factor,
                                                factor.index_select(0, slot)))
    ok = usable & (first | retried)
    factor.masked_fill_(~ok[:, None, None], 0.0)  # (in place: much faster than a where against a broadcast eye)
    factor.diagonal(dim1=-2, dim2=-1).add_((~ok)[:, None])  # the identity's factor is the identity
    return torch.cholesky_inverse(factor), ok, retried & usable


def dual_precondition(g: torch.Tensor, z: torch.Tensor, k_inverse: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """G S_d^{-1} = (n / c) (G - (G Z^T) K^{-1} Z), K^{-1} = (Z Z^T + c I)^{-1} (Woodbury)."""
    n = z.shape[0]
    return (g - ((g @ z.T) @ k_inverse) @ z).mul_(n / c)


def ap_costs(n: int, d_in: int, r: int, backward: str | None = None, n_out: int | None = None,
             d_out: int | None = None) -> dict[str, float]:
    """Flops each exact path adds to a plain backward for one layer: n input rows, d_in inputs, M of r x d_in
    (a GEMM of m x k by k x p counts 2 m k p; factor + inverse of an m x m matrix m^3). dual runs in float64
    (see `DoPr._ap_gradient`), counted as twice the float32 flops. `backward`: "linear" or "conv" where the
    backward path is possible (n_out rows of D, d_out outputs); its M GEMM replaces G's, so it is free, and it
    pays for ||G|| (clipping) with D D^T instead."""
    costs = {
        "primal": 2 * n * d_in**2 + d_in**3 + 2 * r * d_in**2,
        "dual": 2 * (2 * n**2 * d_in + n**3 + 4 * r * n * d_in + 2 * r * n**2),
    }
    if backward:  # Z Z^T, K^-1, K^-1 D (Linear only) or K^-1 Z, and <D D^T, Z Z^T> for the true gradient norm
        n_out, d_out = n_out or n, d_out or r
        solve = min(d_in, d_out) if backward == "linear" else d_in
        costs["backward"] = 2 * n**2 * d_in + n**3 + 2 * n**2 * solve + 2 * n_out**2 * d_out
    return costs


def channels_last_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B * prod(spatial), C): one row per batch element and position."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


@dataclass(eq=False)
class _Layer:
    name: str
    module: nn.Module
    mode: str  # "linear" | "conv_channel" | "conv_full" | "convT_channel"
    augment: bool  # bias preconditioned jointly with the weight
    _tap_cache: dict = field(default_factory=dict, repr=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def d_in(self) -> int:
        shape = self.weight.shape
        if self.mode == "convT_channel":
            d = shape[0]
        elif self.mode == "conv_full":
            d = shape[1] * shape[2]
        else:
            d = shape[1]
        return d + int(self.augment)

    @property
    def r(self) -> int:
        """Rows of the gradient matrix G S_d^{-1} acts on (d_out, or C_out * k for channel-mode convs)."""
        return self.weight.numel() // (self.d_in - int(self.augment))

    def rows(self, z: torch.Tensor) -> torch.Tensor:
        """The layer input as rows Z (n x d_in), in float32 or better."""
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        z = z.detach().to(dtype)
        if self.mode == "linear":
            rows = z.reshape(-1, z.shape[-1])
        else:
            if z.dim() == self.weight.dim() - 1:  # unbatched (C, *spatial)
                z = z.unsqueeze(0)
            if self.mode == "conv_full":
                m = self.module
                z = F.unfold(z.unsqueeze(2), kernel_size=(1, m.kernel_size[0]), dilation=(1, m.dilation[0]),
                             padding=(0, m.padding[0]), stride=(1, m.stride[0]))  # (B, C_in * k, L_out)
            rows = channels_last_rows(z)
        if self.augment:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def grad_matrix(self, g_weight: torch.Tensor, g_bias: torch.Tensor | None, dtype) -> torch.Tensor:
        """G as the (r, d_in) matrix that AP multiplies by S_d^{-1} from the right."""
        g = g_weight.to(dtype)
        if self.mode == "conv_channel":  # (C_out, C_in, *k): every tap's G_j (C_out x C_in) stacked
            return g.movedim(1, -1).reshape(-1, g.shape[1])
        if self.mode == "convT_channel":  # (C_in, C_out, *k): precondition along the input-channel axis
            return g.movedim(0, -1).reshape(-1, g.shape[0])
        g = g.reshape(g.shape[0], -1)
        if self.augment:
            g = torch.cat([g, g_bias.to(dtype)[:, None]], dim=1)
        return g

    def from_grad_matrix(self, m: torch.Tensor, g_weight: torch.Tensor, g_bias: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = g_weight.shape
        if self.mode == "conv_channel":
            m_w = m.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
        elif self.mode == "convT_channel":
            m_w = m.reshape(shape[1], *shape[2:], shape[0]).movedim(-1, 0)
        else:
            if self.augment:
                m, g_bias = m[:, :-1], m[:, -1].to(g_bias.dtype)
            m_w = m.reshape(shape)
        return m_w.to(g_weight.dtype).contiguous(), g_bias

    def conv_weight_grad(self, z: torch.Tensor, d: torch.Tensor, input_grad: bool = False):
        """(input gradient or None, weight gradient) of this conv for input z and output gradient d."""
        m = self.module
        grad_z, grad_w, _ = torch.ops.aten.convolution_backward(
            d, z, m.weight.to(d.dtype), None, m.stride, m.padding, m.dilation, self.mode == "convT_channel",
            m.output_padding, 1, [input_grad, True, False])
        return grad_z, grad_w

    def tap_pairs(self, batch: int, size_in: tuple, size_out: tuple, device) -> list[tuple[torch.Tensor, ...]]:
        """Per kernel tap j, the (input row, output row) pairs it connects (rows in `channels_last_rows` order),
        so that G_j = sum over pairs of d_out z_in^T. Worked out in Python from the shapes alone (no
        data-dependent indexing, so no host synchronization) and cached per shape."""
        key = (batch, tuple(size_in), tuple(size_out), str(device))
        if key in self._tap_cache:
            return self._tap_cache[key]
        m = self.module
        pairs = []
        for tap in itertools.product(*(range(k) for k in m.kernel_size)):
            flat_in, flat_out = [0], [0]  # flat spatial indices, built one dimension at a time
            for dim, j in enumerate(tap):
                stride, padding, dilation = m.stride[dim], m.padding[dim], m.dilation[dim]
                if self.mode == "convT_channel":  # input t feeds output t * stride + j * dilation - padding
                    ok = [(t, t * stride + j * dilation - padding) for t in range(size_in[dim])]
                else:  # output t reads input t * stride + j * dilation - padding
                    ok = [(t * stride + j * dilation - padding, t) for t in range(size_out[dim])]
                ok = [(t_in, t_out) for t_in, t_out in ok if 0 <= t_in < size_in[dim] and 0 <= t_out < size_out[dim]]
                flat_in = [f * size_in[dim] + t_in for f in flat_in for t_in, _ in ok]
                flat_out = [f * size_out[dim] + t_out for f in flat_out for _, t_out in ok]
            b = torch.arange(batch, device=device)[:, None]
            rows_in = b * math.prod(size_in) + torch.tensor(flat_in, dtype=torch.long, device=device)
            rows_out = b * math.prod(size_out) + torch.tensor(flat_out, dtype=torch.long, device=device)
            pairs.append((rows_in.reshape(-1), rows_out.reshape(-1)))
        self._tap_cache[key] = pairs
        return pairs

    def as_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """The weight as the (d_out, d_in) matrix Muon orthogonalizes."""
        if self.mode == "convT_channel":
            t = t.transpose(0, 1)  # (C_in, C_out, k) -> (C_out, C_in, k)
        return t.reshape(t.shape[0], -1)

    def from_matrix(self, m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.mode == "convT_channel":
            return m.reshape(like.shape[1], like.shape[0], *like.shape[2:]).transpose(0, 1)
        return m.reshape(like.shape)


@dataclass(eq=False)
class _Pending:
    """What one layer gathered since the last step: a summed moment (primal) or its input rows (dual,
    backward), and for the backward path what its backward already did."""

    path: str
    rows: int = 0
    moment: torch.Tensor | None = None
    inputs: list = field(default_factory=list)
    applied: tuple | None = None  # backward path, after its backward: what M was made of (see _backward_ap)
    gram: torch.Tensor | None = None  # Z Z^T of the backward path (for ||G||)
    whiten: torch.Tensor | None = None  # backward path: n K^{-1} (the identity after a failure: M = G)


class _BackwardAP(torch.autograd.Function):
    """Identity on the layer's (already computed) output; its backward returns the input gradient as usual
    and, as the weight gradient, the optimizer's AP gradient M (the weight gradient for the whitened input)."""

    @staticmethod
    def forward(ctx, z, weight, bias, out, optimizer, layer):
        ctx.save_for_backward(z, weight)
        ctx.optimizer, ctx.layer, ctx.has_bias = optimizer, layer, bias is not None
        return out

    @staticmethod
    def backward(ctx, d):
        z, weight = ctx.saved_tensors
        grad_z, grad_w, grad_b = ctx.optimizer._backward_ap(ctx.layer, z, d, ctx.needs_input_grad[0])
        return grad_z, grad_w, (grad_b if ctx.has_bias else None), None, None, None


class _StatsHook:
    """Forward hook that gathers a layer's input statistics. Deep copies of the module (EMA copies) share
    this object but are not the registered module, so they never contribute statistics."""

    def __init__(self, optimizer: "DoPr", layer: _Layer):
        self.optimizer, self.layer = optimizer, layer

    def __call__(self, module: nn.Module, inputs: tuple, output):
        if module is self.layer.module and module.training and torch.is_grad_enabled():
            return self.optimizer._record(self.layer, inputs[0], output)
        return None

    def __deepcopy__(self, memo):
        return self


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T with the quintic iteration (in bfloat16, as torch.optim.Muon)."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_lr(lr: float, shape: torch.Size, adjust_lr: str) -> float:
    d_out, d_in = shape[0], shape[1]
    if adjust_lr == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(d_out, d_in))
    return lr * math.sqrt(max(1, d_out / d_in))


def fused_adamw_supported(params) -> bool:
    """torch's fused AdamW kernel exists for these tensors' device and dtype."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper moved: the two devices that have had the kernel longest
        devices = {"cpu", "cuda"}
    return all(p.device.type in devices and p.is_floating_point() for p in params)


def _grams(rows: list[torch.Tensor]) -> torch.Tensor:
    """Z Z^T of equal-shape row blocks, written straight into one (B, n, n) batch."""
    out = rows[0].new_empty(len(rows), rows[0].shape[0], rows[0].shape[0])
    for i, z in enumerate(rows):
        torch.mm(z, z.T, out=out[i])
    return out


def _grouped(items: list, key) -> list[list]:
    """items in lists of equal key (first-seen order): what one batched factorization can take."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def _count(state: dict, **events: torch.Tensor) -> None:
    """Add this step's events (bool tensors: skipped, fallback, retried) to the layer's counters
    ap_skipped_stats, ap_fallbacks, ap_retries, kept as tensors on the device and read only by health()."""
    for name, event in events.items():
        key = {"skipped": "ap_skipped_stats", "fallback": "ap_fallbacks", "retried": "ap_retries"}[name]
        if key not in state:
            state[key] = torch.zeros((), dtype=torch.float32, device=event.device)
        state[key].add_(event)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class DoPr(torch.optim.Optimizer):
    """DoPr over AdamW (`base="adam"`), Muon (`base="muon"`), Signum (`base="signum"`; its beta is `momentum`)
    or plain SGD (`base="sgd"`, for testing AP).

    Create it after any EMA / deep copies of `model` and call `step()` after `backward()` as usual; clip with
    `clip_grad_norm_` (this class's method or `dopr_robot.optim.clip_grad_norm_`), not torch's, because a
    backward-path layer's .grad already holds M. `ap=False` turns activation preconditioning off.
    `adam_layers`: modules whose weights get AdamW (after AP when ap=True) even when base="muon".
    `path`: "auto" (cheapest exact path per layer and step) or force "primal" | "dual" | "backward" where it
    is exact (otherwise primal). `stats_from`: "batch" or "previous_batch" (S from the minibatch before).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, base: str = "adam", ap: bool = True,
                 damping: float = 1.0, damping_form: str = "mean", damping_eps: float = 1e-8,
                 ema_decay: float = 0.0, refresh_every: int = 1, conv_mode: str = "channel",
                 bias_augment: bool = False, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 adjust_lr: str = "match_rms_adamw", exclude: tuple[str, ...] = (), stats_from: str = "batch",
                 adam_layers=(), path: str = "auto", fused: bool | None = None):
        if base not in BASES:
            raise ValueError(f"base must be one of {', '.join(BASES)}; got {base!r}")
        if damping_form not in ("mean", "trace") or conv_mode not in ("channel", "full"):
            raise ValueError("damping_form must be mean|trace and conv_mode channel|full")
        if adjust_lr not in ("match_rms_adamw", "original"):
            raise ValueError(f"adjust_lr must be match_rms_adamw or original; got {adjust_lr!r}")
        if damping < 0 or not 0 <= ema_decay < 1 or refresh_every < 1:
            raise ValueError("need damping >= 0, 0 <= ema_decay < 1, refresh_every >= 1")
        if stats_from not in ("batch", "previous_batch") or path not in ("auto", *PATHS):
            raise ValueError("stats_from must be batch|previous_batch and path auto|primal|dual|backward")
        self.layers, self.unsupported_layers = self._find_layers(model, conv_mode, bias_augment, exclude)
        if self.unsupported_layers:
            warnings.warn(f"DoPr: {len(self.unsupported_layers)} conv layer(s) are grouped, non-zero-padded or use "
                          f"padding='same' ({', '.join(self.unsupported_layers[:5])}"
                          f"{', ...' if len(self.unsupported_layers) > 5 else ''}): they get plain AdamW, no AP "
                          "(counted in health()['ap_layers_unsupported'])", stacklevel=2)
        adam_ids = {id(m) for m in adam_layers}
        matrix = [layer.weight for layer in self.layers if id(layer.module) not in adam_ids]
        matrix_ids = {id(p) for p in matrix}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in matrix_ids]
        if fused is None:
            fused = fused_adamw_supported(others + (matrix if base == "adam" else []))
        groups = [{"params": matrix, "update": base}]
        if others:
            groups.append({"params": others, "update": "sgd" if base == "sgd" else "adam"})
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, adjust_lr=adjust_lr, fused=fused)
        super().__init__(groups, defaults)
        self.ap = ap
        self.damping, self.damping_form, self.damping_eps = damping, damping_form, damping_eps
        self.ema_decay, self.refresh_every, self.stats_from, self.path = ema_decay, refresh_every, stats_from, path
        self.steps = 0
        self._pending: dict[_Layer, _Pending] = {}
        self.last_paths: dict[str, str] = {}  # layer name -> path of the last step (health, tests, benchmarks)
        self._path_cache: dict[tuple, str] = {}
        self._layer_of = {layer.weight: layer for layer in self.layers}
        self._hooks = [layer.module.register_forward_hook(_StatsHook(self, layer)) for layer in self.layers] \
            if ap else []

    @staticmethod
    def _find_layers(model, conv_mode, bias_augment, exclude) -> tuple[list[_Layer], list[str]]:
        """(layers AP preconditions, names of conv layers it cannot: grouped, non-zero-padded or padding given
        as a string, which the channel-mode derivation and the backward path's zero-padded products do not
        cover)."""
        layers, unsupported = [], []
        for name, m in model.named_modules():
            if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or not m.weight.requires_grad:
                continue
            if any(pattern in name for pattern in exclude):
                continue
            if isinstance(m, nn.Linear):
                mode = "linear"
            elif not isinstance(m, CONV_TYPES) or m.groups != 1 or m.padding_mode != "zeros" \
                    or isinstance(m.padding, str):
                unsupported.append(name)  # grouped / non-zero-padded / 'same' convs: AdamW, counted and warned
                continue
            elif isinstance(m, nn.modules.conv._ConvTransposeNd):
                mode = "convT_channel"
            else:
                mode = "conv_full" if conv_mode == "full" and isinstance(m, nn.Conv1d) else "conv_channel"
            has_bias = m.bias is not None and m.bias.requires_grad
            if bias_augment and has_bias and mode in ("conv_channel", "convT_channel"):
                raise ValueError(f"bias_augment is not defined for channel-mode conv layer {name!r} (one S is "
                                 "shared by all taps, and a bias is not a tap; ConvTranspose1d has only this "
                                 "form, Conv1d also conv_mode='full')")
            layers.append(_Layer(name, m, mode, bias_augment and has_bias))
        return layers, unsupported

    # ---- choosing the path (the one place) -----------------------------------------------------------------
    def _batch_exact(self) -> bool:
        """dual and backward are exact only when S is this batch's own moment, whole, on this process."""
        return self.ema_decay == 0 and self.refresh_every == 1 and self.stats_from == "batch" and not _distributed()

    def choose_path(self, layer: _Layer, n: int, n_out: int | None = None, d_out: int | None = None) -> str:
        """The cheapest exact path for this layer and step (or the forced one where it is exact); `n_out`
        (rows of D) is given only when the backward path is possible (first call of a step). Worked out once
        per layer shape and setting, then looked up."""
        key = (layer.mode, layer.d_in, layer.r, layer.augment, layer.weight.device.type, n, n_out, d_out,
               self.path, self._batch_exact(), self.damping == 0 and self.damping_eps == 0)
        if key not in self._path_cache:
            self._path_cache[key] = self._cheapest_path(layer, n, n_out, d_out)
        return self._path_cache[key]

    def _cheapest_path(self, layer: _Layer, n: int, n_out: int | None, d_out: int | None) -> str:
        if not self._batch_exact() or self.damping == 0 and self.damping_eps == 0:
            return "primal"  # (Woodbury divides by lambda: undamped, only the primal solve is defined)
        backward = None
        if n_out is not None and not layer.augment and layer.mode != "conv_full":
            backward = "linear" if layer.mode == "linear" else "conv"
        if self.path != "auto":
            return self.path if (self.path != "backward" or backward) else "primal"
        if layer.mode != "linear" and layer.weight.device.type == "cuda":
            # On a GPU the flop count is the wrong model for convs: their dual/backward paths are many small
            # n x n factorizations and per-tap products, latency-bound there. Measured on an H200 (README,
            # Benchmarks): ConditionalUnet1D 5.94x AdamW with flop-chosen paths, 3.25x all primal; the MLP's
            # Linear layers still gain from the flop choice (2.79x against 3.11x), so they keep it.
            return "primal"
        costs = ap_costs(n, layer.d_in, layer.r, backward, n_out, d_out)
        return min(costs, key=costs.get)

    # ---- statistics (forward hook) ---------------------------------------------------------------------
    def _collecting(self) -> bool:
        if self.ema_decay > 0 or self.steps % self.refresh_every == 0:
            return True  # previous_batch also collects the batch just before each refresh
        return self.stats_from == "previous_batch" and (self.steps + 1) % self.refresh_every == 0

    def _record(self, layer: _Layer, z: torch.Tensor, output):
        if not self._collecting():
            return None
        rows = layer.rows(z)
        pending = self._pending.get(layer)
        if pending is None:
            n_out = d_out = None
            if layer.mode == "linear":
                n_out, d_out = rows.shape[0], output.shape[-1]
            elif z.dim() == layer.weight.dim():  # batched conv input (B, C, *spatial)
                n_out, d_out = output.numel() // output.shape[1], output.shape[1]
            pending = self._pending[layer] = _Pending(self.choose_path(layer, rows.shape[0], n_out, d_out))
            if pending.path == "backward":
                pending.inputs.append(rows)
                pending.rows = rows.shape[0]
                return _BackwardAP.apply(z, layer.weight, layer.module.bias, output.detach(), self, layer)
        elif pending.path == "backward":  # a second call before step(): its S spans both calls
            self._leave_backward_path(layer, pending)
        if pending.path == "primal":
            moment = rows.T @ rows
            pending.moment = moment if pending.moment is None else pending.moment.add_(moment)
        else:
            pending.inputs.append(rows)
        pending.rows += rows.shape[0]
        return None

    def _leave_backward_path(self, layer: _Layer, pending: _Pending) -> None:
        """Turn a backward-path layer into a step-time one; if its backward already wrote M_1 into .grad,
        replace it by G_1: .grad += D_1^T Z_1 - M_1."""
        grad = layer.weight.grad
        if pending.applied is not None and grad is not None:
            if layer.mode == "linear":
                z, d, left, right = pending.applied  # M_1 = L^T R
                grad.add_((d.T @ z - left.T @ right).to(grad.dtype))
            else:
                z, d, zw = pending.applied  # M_1 = conv weight gradient for input Zw; linear in the input
                grad.add_(layer.conv_weight_grad((z - zw).to(d.dtype), d)[1].to(grad.dtype))
        pending.applied = None
        pending.path = self.choose_path(layer, pending.rows)
        if pending.path == "primal":
            pending.moment = sum(r.T @ r for r in pending.inputs)
            pending.inputs = []

    def _backward_ap(self, layer: _Layer, z: torch.Tensor, d: torch.Tensor, input_grad: bool):
        """(input gradient, weight gradient, bias gradient) of a backward-path layer. The weight gradient is
        M: for a Linear n (K^{-1} D)^T Z or D^T (n K^{-1} Z), whichever solves against fewer columns; for a
        conv the weight gradient for the whitened input Zw = n K^{-1} Z (every tap's G_j = D^T Z_j becomes
        D^T Zw_j = G_j S_d^{-1}). G when the layer has left the backward path (a second call before step)."""
        pending = self._pending.get(layer)
        rows = layer.rows(z)
        weight = layer.weight
        linear = layer.mode == "linear"
        if linear:
            d_rows = d.reshape(-1, d.shape[-1]).to(rows.dtype)
            grad_b = d_rows.sum(0).to(d.dtype)
            grad_z = (d @ weight.to(d.dtype)) if input_grad else None
        else:
            d_rows = channels_last_rows(d).to(rows.dtype)
            grad_b = d.sum([i for i in range(d.dim()) if i != 1])
        active = pending is not None and pending.path == "backward" and pending.applied is None
        if linear:
            if not active:
                return grad_z, (d_rows.T @ rows).to(weight.dtype), grad_b
            whiten = self._whitening(pending)
            if d_rows.shape[1] <= rows.shape[1]:  # solve against D's fewer columns
                left, right = whiten @ d_rows, rows
            else:
                left, right = d_rows, whiten @ rows
            pending.applied = (rows, d_rows, left, right)
            return grad_z, (left.T @ right).to(weight.dtype), grad_b
        zw = z
        if active:
            zw_rows = self._whitening(pending) @ rows
            zw = zw_rows.reshape(z.shape[0], *z.shape[2:], z.shape[1]).movedim(-1, 1).to(z.dtype).contiguous()
        grad_z, grad_w = layer.conv_weight_grad(zw, d, input_grad)
        if active:
            pending.applied = (z.detach(), d.detach(), zw)
        return grad_z, grad_w.to(weight.dtype), grad_b.to(d.dtype)

    def _whitening(self, pending: _Pending) -> torch.Tensor:
        """n K^{-1} of a backward-path layer. The first backward of a step factors every backward-path layer
        recorded in the forward at once, batched by row count (Z is known after the forward; D is not needed)."""
        if pending.whiten is None:
            todo = [(layer, p) for layer, p in self._pending.items()
                    if p.path == "backward" and p.whiten is None and p.inputs]
            for group in _grouped(todo, key=lambda item: (item[1].inputs[0].shape[0], item[1].inputs[0].dtype)):
                rows = [p.inputs[0] for _, p in group]
                grams = _grams(rows)
                n = grams.shape[-1]
                traces = grams.diagonal(dim1=-2, dim2=-1).sum(-1) / n
                lam = self._lambdas(traces, [layer.d_in for layer, _ in group])
                inverses, ok, retried = damped_inverses(grams, n * lam)
                whitens = inverses * torch.where(ok, n, 1.0)[:, None, None]  # n K^-1, or the identity: M = G
                for i, (layer, p) in enumerate(group):
                    p.gram, p.whiten = grams[i], whitens[i]
                    finite = torch.isfinite(lam[i])
                    _count(self.state[layer.weight], skipped=~finite, fallback=finite & ~ok[i], retried=retried[i])
        return pending.whiten

    def _lambdas(self, traces: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """lambda of each matrix of a batch from its trace (of S) and its layer's d_in (Python ints: no host
        to device copy)."""
        if len(set(widths)) == 1:
            return damping(traces, widths[0], self.damping, self.damping_form, self.damping_eps)
        return torch.stack([damping(t, d, self.damping, self.damping_form, self.damping_eps)
                            for t, d in zip(traces, widths)])

    # ---- primal statistics and refresh -----------------------------------------------------------------
    def _reduced_moment(self, pending: _Pending) -> torch.Tensor:
        """This step's S, all-reduced under torch.distributed (possibly non-finite)."""
        moment, rows = pending.moment, pending.rows
        if _distributed():
            packed = torch.cat([moment.flatten(), moment.new_tensor([rows])])
            dist.all_reduce(packed)
            moment, rows = packed[:-1].view_as(moment), packed[-1]
        return moment.div_(rows)  # (the pending moment is ours)

    def _fold(self, state: dict, s: torch.Tensor | None) -> None:
        """Fold this step's S into the statistic; a non-finite S is skipped (never enters the average). A NaN or
        inf input makes its own diagonal entry of S non-finite: one scalar test for the whole matrix."""
        if s is None:
            return
        finite = torch.isfinite(s.diagonal().sum())
        if "ap_stat" not in state:
            state["ap_stat"], state["ap_has_stat"] = torch.zeros_like(s), s.new_zeros(())
        old, has = state["ap_stat"], state["ap_has_stat"] > 0
        s = torch.where(finite, s, old)  # (one pass; the EMA below updates in place: two passes in all)
        if self.ema_decay > 0:  # the first statistic is taken whole
            old.lerp_(s, torch.where(has, 1 - self.ema_decay, 1.0).to(s.dtype))
        else:
            state["ap_stat"] = s
        state["ap_has_stat"] = (has | finite).to(s.dtype)
        _count(state, skipped=~finite)

    def _primal_inverses(self, primal: list[tuple[_Layer, _Pending | None]]) -> None:
        """state["ap_inverse"] = S_d^{-1} of every primal layer (the identity where there is no usable statistic
        or the factorization failed twice: M = G): fold this step's S into the statistic (after the
        factorization with stats_from=previous_batch) and refresh every refresh_every steps, layers of equal
        width factored in one batched call."""
        due, fold_after = [], []
        for layer, pending in primal:
            state = self.state[layer.weight]
            s_new = self._reduced_moment(pending) if pending is not None and pending.moment is not None else None
            previous = self.stats_from == "previous_batch" and "ap_stat" in state
            if not previous:
                self._fold(state, s_new)
            if "ap_stat" in state and (self.steps % self.refresh_every == 0 or "ap_inverse" not in state):
                due.append((layer, state))
            if previous:
                fold_after.append((state, s_new))
        for group in _grouped(due, key=lambda item: (item[1]["ap_stat"].shape[0], item[1]["ap_stat"].dtype)):
            stats = torch.stack([state["ap_stat"] for _, state in group]) if len(group) > 1 \
                else group[0][1]["ap_stat"].unsqueeze(0)  # (a view: damped_inverses restores what it touches)
            traces = stats.diagonal(dim1=-2, dim2=-1).sum(-1)
            lam = self._lambdas(traces, [stats.shape[-1]] * len(group))
            usable = torch.stack([state["ap_has_stat"] > 0 for _, state in group])
            inverses, ok, retried = damped_inverses(stats, lam, usable)
            for i, (layer, state) in enumerate(group):
                state["ap_inverse"], state["ap_lambda"], state["ap_ok"] = inverses[i], lam[i], ok[i].to(lam.dtype)
                _count(state, fallback=usable[i] & ~ok[i], retried=retried[i])  # (skips counted when folded)
        for state, s_new in fold_after:
            self._fold(state, s_new)

    def _ap_gradients(self) -> dict[torch.Tensor, torch.Tensor]:
        """{parameter: M} for every layer whose M is formed at step time (primal and dual; a backward-path
        layer's .grad already holds M)."""
        out: dict[torch.Tensor, torch.Tensor] = {}
        primal, dual = [], []
        for layer in self.layers:
            if layer.weight.grad is None:
                continue
            pending = self._pending.get(layer)
            path = pending.path if pending is not None else "primal"
            if path == "dual" and self.choose_path(layer, pending.rows) == "primal":
                pending.moment, pending.inputs, pending.path = sum(z.T @ z for z in pending.inputs), [], "primal"
                path = "primal"  # several calls made primal the cheaper path
            self.last_paths[layer.name] = path
            if path == "primal":
                primal.append((layer, pending))
            elif path == "dual":
                dual.append((layer, pending))
        self._primal_inverses(primal)
        for layer, _ in primal:  # M = G S_d^-1 (S_d^-1 is the identity after a failure: M = G)
            inverse = self.state[layer.weight].get("ap_inverse")
            self._precondition(layer, out, lambda g, inverse=inverse: g if inverse is None else g @ inverse)
        self._dual_gradients(dual, out)
        return out

    def _dual_gradients(self, dual: list[tuple[_Layer, _Pending]], out: dict) -> None:
        """M by Woodbury for the dual-path layers, their n x n kernels factored in batches of equal n. In
        float64: G - (G Z^T) K^-1 Z cancels ~1/gamma of float32's digits."""
        inputs = [(layer, torch.cat(p.inputs).double()) for layer, p in dual]
        for group in _grouped(inputs, key=lambda item: item[1].shape[0]):
            grams = _grams([z for _, z in group])
            n = grams.shape[-1]
            traces = grams.diagonal(dim1=-2, dim2=-1).sum(-1) / n
            lam = self._lambdas(traces, [layer.d_in for layer, _ in group])
            inverses, ok, retried = damped_inverses(grams, n * lam)
            for i, (layer, z) in enumerate(group):
                finite = torch.isfinite(lam[i])
                _count(self.state[layer.weight], skipped=~finite, fallback=finite & ~ok[i], retried=retried[i])
                self._precondition(layer, out, lambda g, i=i, z=z: torch.where(
                    ok[i], dual_precondition(g.double(), z, inverses[i], n * lam[i]), g))

    def _precondition(self, layer: _Layer, out: dict, solve) -> None:
        """out[weight] (and out[bias] with bias_augment) = the layer's gradient matrix G through `solve`."""
        w = layer.weight
        g_bias = None
        if layer.augment:
            g_bias = layer.module.bias.grad
            g_bias = g_bias if g_bias is not None else torch.zeros_like(layer.module.bias)
        m = solve(layer.grad_matrix(w.grad, g_bias, self._stat_dtype(w)))
        out[w], m_bias = layer.from_grad_matrix(m, w.grad, g_bias)
        if layer.augment:
            out[layer.module.bias] = m_bias

    @staticmethod
    def _stat_dtype(w: torch.Tensor) -> torch.dtype:
        return torch.float64 if w.dtype == torch.float64 else torch.float32

    # ---- clipping on the true gradient -----------------------------------------------------------------
    def true_grad_norms_sq(self) -> dict[torch.Tensor, torch.Tensor]:
        """||G||_F^2 for each weight whose .grad holds M (backward path): <D D^T, Z Z^T> for a Linear; for a
        conv the sum over taps of the same with each tap's (input row, output row) pairs."""
        out = {}
        for layer, pending in self._pending.items():
            if pending.path != "backward" or pending.applied is None:
                continue
            gram = pending.gram
            if layer.mode == "linear":
                d = pending.applied[1]
                out[layer.weight] = ((d @ d.T) * gram).sum()
                continue
            z, d, _ = pending.applied
            d_rows = channels_last_rows(d).to(gram.dtype)
            dd = d_rows @ d_rows.T
            total = gram.new_zeros(())
            for rows_in, rows_out in layer.tap_pairs(z.shape[0], z.shape[2:], d.shape[2:], gram.device):
                total += (gram[rows_in][:, rows_in] * dd[rows_out][:, rows_out]).sum()
            out[layer.weight] = total
        return out

    @torch.no_grad()
    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ measured on the true gradients: a backward-path weight counts
        ||G||, and its M is scaled by the same coefficient (M is linear in D, so that is AP of the clipped G)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        true = {id(w.grad): sq for w, sq in self.true_grad_norms_sq().items() if w.grad is not None}
        plain = [g for g in grads if id(g) not in true]
        dtype, device = grads[0].dtype, grads[0].device
        squares = [n.to(dtype) ** 2 for n in torch._foreach_norm(plain)] if plain else []
        total = torch.stack(squares + [sq.to(dtype=dtype, device=device) for sq in true.values()]).sum().sqrt()
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coefficient.to(grads[0].device))
        return total

    # ---- the step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ap_grads: dict[torch.Tensor, torch.Tensor] = {}
        if self.ap:
            ap_grads = self._ap_gradients()
            self._pending.clear()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [ap_grads.get(p, p.grad) for p in params]
            if group["update"] == "adam":
                self._adamw(params, grads, group)
                continue
            for p, g in zip(params, grads):
                if group["update"] == "muon":
                    self._muon(p, g, self.state[p], group, self._layer_of[p])
                elif group["update"] == "signum":
                    self._signum(p, g, self.state[p], group)
                else:
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(g, alpha=-group["lr"])
        self.steps += 1
        return loss

    def _adamw(self, params, grads, group) -> None:
        """torch.optim.AdamW's update through its functional form (fused kernel when group["fused"])."""
        if not params:
            return
        fused = group["fused"]
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device) if fused \
                    else torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif not torch.is_tensor(state["step"]):  # trainer states written before the fused kernel
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32,
                                             device=p.device if fused else "cpu")
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        functional_adamw(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                         [s["step"] for s in states], foreach=False if not fused else None, fused=fused or None,
                         amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                         weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    @staticmethod
    def _signum(p, g, state, group) -> None:
        """Signum (Bernstein et al. 2018): m <- beta m + (1 - beta) g, p <- p (1 - lr wd) - lr sign(m)."""
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        buf.lerp_(g, 1 - group["momentum"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(buf.sign(), alpha=-group["lr"])

    @staticmethod
    def _muon(p, g, state, group, layer: _Layer) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum) if group["nesterov"] else buf
        matrix = layer.as_matrix(update)
        ortho = layer.from_matrix(newton_schulz(matrix, group["ns_steps"]), p)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(ortho.to(p.dtype), alpha=-muon_lr(group["lr"], matrix.shape, group["adjust_lr"]))

    # ---- persistence and health -------------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["dopr"] = {"steps": self.steps}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("dopr", {})
        super().load_state_dict(state_dict)
        self.steps = int(extra.get("steps", 0))
        for layer in self.layers:  # states saved before the counters became device tensors
            state = self.state.get(layer.weight, {})
            for key in ("ap_fallbacks", "ap_retries", "ap_skipped_stats"):
                if key in state and not torch.is_tensor(state[key]):
                    state[key] = torch.tensor(float(state[key]), device=layer.weight.device)
            if "ap_stat" in state and "ap_has_stat" not in state:
                state["ap_has_stat"] = state["ap_stat"].new_ones(())
            if state.pop("ap_failed", None) is not None and "ap_inverse" not in state:
                state["ap_inverse"] = torch.eye(layer.d_in, device=layer.weight.device)  # M = G until a refresh
            if "ap_inverse" in state and "ap_ok" not in state:
                state["ap_ok"] = state["ap_stat"].new_ones(()) if "ap_stat" in state else torch.ones(())

    def health(self, spectrum: bool = False) -> dict[str, float]:
        """Counts (failed factorizations, 10x-damping retries, skipped non-finite statistics), how many layers
        took each path last step; with `spectrum`, per primal layer min / max eigenvalue of S_d and condition.
        The counts live on the device as tensors; this is where they are read (a host synchronization)."""
        out: dict[str, float] = {"ap_fallbacks": 0, "ap_retries": 0, "ap_skipped_stats": 0}
        out.update({f"ap_layers_{p}": 0 for p in PATHS})
        out["ap_layers_unsupported"] = len(self.unsupported_layers)
        for layer in self.layers:
            state = self.state.get(layer.weight, {})
            for key in ("ap_fallbacks", "ap_retries", "ap_skipped_stats"):
                out[key] += int(state[key]) if key in state else 0
            if layer.name in self.last_paths:
                out[f"ap_layers_{self.last_paths[layer.name]}"] += 1
            if spectrum and state.get("ap_ok", 0) > 0 and self.last_paths.get(layer.name, "primal") == "primal":
                inv_eig = torch.linalg.eigvalsh(state["ap_inverse"])
                lo, hi = 1 / inv_eig[-1].item(), 1 / inv_eig[0].item()
                out[f"ap_eig_min/{layer.name}"] = lo
                out[f"ap_eig_max/{layer.name}"] = hi
                out[f"ap_cond/{layer.name}"] = hi / lo if lo > 0 else math.inf
        return out

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
