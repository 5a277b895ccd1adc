r"""DoPr: double preconditioning = activation-wise preconditioning (AP) composed with a gradient
preconditioner (GP: AdamW or Muon). Zhang, Shah, Zhang, Zhang, Matni, Simchowitz, arXiv 2606.06418 (2026).

For a weight W (d_out x d_in) of a layer that sees inputs z (rows of Z, n x d_in) and has gradient G:

    S   = Z^T Z / n                              uncentered second moment of the layer input (>= float32)
    S_d = S + (gamma * tr(S) / d_in + eps) I     damping relative to the mean eigenvalue ("mean" form);
                                                 the paper's written "trace" form is S + (gamma tr(S) + eps) I
    M   = G S_d^{-1}                             the AP gradient (Cholesky solve; 10x damping on failure,
                                                 then M = G, counted)
    W  <- GP(M)                                  AdamW moments of M, or Muon: Nesterov momentum on M,
                                                 Newton-Schulz orthogonalization, shape-dependent lr scale

Why: with z' = A z and W' = W A^{-1} (the same network), G' = G A^T and S' = A S A^T, so M' = M A^{-1} and an
AP-SGD step moves the network function identically in both parametrizations. The update no longer depends on
how the layer's input happens to be scaled or correlated, so features are learned uniformly.

Layers: Linear; Conv1d and ConvTranspose1d in "channel" mode (S over input channels, averaged over batch and
positions, one S^{-1} for every kernel tap; the invariant form under channel-mixing maps) or, for Conv1d,
"full" mode (S over unfolded patches of C_in * k, KFC-style). ConvTranspose1d weights are (C_in, C_out, k), so
there M[:, o, j] = S^{-1} G[:, o, j]. All other parameters (biases, norm gains, ...) get AdamW (plain SGD when
base="sgd"); with bias_augment a Linear (or full-mode Conv1d) bias is preconditioned jointly with its weight
through a constant-1 input.

Statistics come from forward hooks, only in training mode with grad enabled; several calls before one step
accumulate weighted by rows; under torch.distributed they are all-reduced before the solve, so every rank
takes the same step. With ap=False, base="adam" is AdamW exactly and base="muon" is Muon for every matrix
and conv weight (reshaped to (C_out, C_in * k), never refused, never orthogonalized per output channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@dataclass(eq=False)
class _Layer:
    name: str
    module: nn.Module
    mode: str  # "linear" | "conv_channel" | "conv_full" | "convT_channel"
    augment: bool  # bias preconditioned jointly with the weight

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def input_moment(self, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(sum over rows of z z^T, number of rows) for this layer's input, in float32 or better."""
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        z = z.detach().to(dtype)
        if self.mode == "linear":
            rows = z.reshape(-1, z.shape[-1])
        else:
            if z.dim() == 2:  # unbatched (C, L)
                z = z.unsqueeze(0)
            if self.mode == "conv_full":
                m = self.module
                z = F.unfold(z.unsqueeze(2), kernel_size=(1, m.kernel_size[0]), dilation=(1, m.dilation[0]),
                             padding=(0, m.padding[0]), stride=(1, m.stride[0]))  # (B, C_in * k, L_out)
            rows = z.transpose(1, 2).reshape(-1, z.shape[1])
        if self.augment:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows.T @ rows, rows.shape[0]

    def precondition(self, factor: torch.Tensor, g_weight: torch.Tensor, g_bias: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Solve with the Cholesky factor of S_d: the AP gradients of the weight (and the augmented bias)."""
        dtype = factor.dtype
        if self.mode in ("conv_channel", "convT_channel"):
            g = g_weight.to(dtype)
            if self.mode == "conv_channel":  # (C_out, C_in, k): M_j^T = S^-1 G_j^T for every tap j
                c_out, c_in, k = g.shape
                rhs = g.permute(1, 0, 2).reshape(c_in, c_out * k)
                m = torch.cholesky_solve(rhs, factor).reshape(c_in, c_out, k).permute(1, 0, 2)
            else:  # (C_in, C_out, k): precondition along the input-channel axis directly
                m = torch.cholesky_solve(g.reshape(g.shape[0], -1), factor).reshape(g.shape)
            return m.to(g_weight.dtype), g_bias
        g = g_weight.reshape(g_weight.shape[0], -1).to(dtype)  # (d_out, d_in): Linear, or Conv1d unfolded
        if self.augment:
            g = torch.cat([g, g_bias.to(dtype)[:, None]], dim=1)
        m = torch.cholesky_solve(g.T, factor).T
        if self.augment:
            return m[:, :-1].reshape(g_weight.shape).to(g_weight.dtype), m[:, -1].to(g_bias.dtype)
        return m.reshape(g_weight.shape).to(g_weight.dtype), g_bias

    def as_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """The weight as the (d_out, d_in) matrix Muon orthogonalizes."""
        if self.mode == "convT_channel":
            t = t.transpose(0, 1)  # (C_in, C_out, k) -> (C_out, C_in, k)
        return t.reshape(t.shape[0], -1)

    def from_matrix(self, m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.mode == "convT_channel":
            return m.reshape(like.shape[1], like.shape[0], *like.shape[2:]).transpose(0, 1)
        return m.reshape(like.shape)


class _StatsHook:
    """Forward hook that accumulates a layer's input moment. Deep copies of the module (EMA copies) share
    this object but are not the registered module, so they never contribute statistics."""

    def __init__(self, optimizer: "DoPr", layer: _Layer):
        self.optimizer, self.layer = optimizer, layer

    def __call__(self, module: nn.Module, inputs: tuple, output) -> None:
        if module is self.layer.module and module.training and torch.is_grad_enabled():
            self.optimizer._accumulate(self.layer, inputs[0])

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


class DoPr(torch.optim.Optimizer):
    """DoPr over AdamW (`base="adam"`), Muon (`base="muon"`) or plain SGD (`base="sgd"`, for testing AP).

    Create it after any EMA / deep copies of `model` and call `step()` after `backward()` as usual.
    `ap=False` turns activation preconditioning off (then this is AdamW, Muon or SGD).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, base: str = "adam", ap: bool = True,
                 damping: float = 1.0, damping_form: str = "mean", damping_eps: float = 1e-8,
                 ema_decay: float = 0.0, refresh_every: int = 1, conv_mode: str = "channel",
                 bias_augment: bool = False, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 adjust_lr: str = "match_rms_adamw", exclude: tuple[str, ...] = ()):
        if base not in ("adam", "muon", "sgd"):
            raise ValueError(f"base must be adam, muon or sgd; got {base!r}")
        if damping_form not in ("mean", "trace") or conv_mode not in ("channel", "full"):
            raise ValueError("damping_form must be mean|trace and conv_mode channel|full")
        if adjust_lr not in ("match_rms_adamw", "original"):
            raise ValueError(f"adjust_lr must be match_rms_adamw or original; got {adjust_lr!r}")
        if damping < 0 or not 0 <= ema_decay < 1 or refresh_every < 1:
            raise ValueError("need damping >= 0, 0 <= ema_decay < 1, refresh_every >= 1")
        self.layers = self._find_layers(model, conv_mode, bias_augment, exclude)
        matrix = [layer.weight for layer in self.layers]
        matrix_ids = {id(p) for p in matrix}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in matrix_ids]
        groups = [{"params": matrix, "update": base}]
        if others:
            groups.append({"params": others, "update": "sgd" if base == "sgd" else "adam"})
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, adjust_lr=adjust_lr)
        super().__init__(groups, defaults)
        self.ap = ap
        self.damping, self.damping_form, self.damping_eps = damping, damping_form, damping_eps
        self.ema_decay, self.refresh_every = ema_decay, refresh_every
        self.steps = 0
        self._pending: dict[_Layer, list] = {}
        self._hooks = [layer.module.register_forward_hook(_StatsHook(self, layer)) for layer in self.layers] \
            if ap else []

    @staticmethod
    def _find_layers(model, conv_mode, bias_augment, exclude) -> list[_Layer]:
        layers = []
        for name, m in model.named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)) or not m.weight.requires_grad:
                continue
            if any(pattern in name for pattern in exclude):
                continue
            if isinstance(m, nn.Linear):
                mode = "linear"
            elif m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                continue  # grouped / non-zero-padded convs: not covered by the derivation; plain AdamW
            elif isinstance(m, nn.ConvTranspose1d):
                mode = "convT_channel"
            else:
                mode = "conv_full" if conv_mode == "full" else "conv_channel"
            augment = bias_augment and m.bias is not None and m.bias.requires_grad and mode in ("linear", "conv_full")
            layers.append(_Layer(name, m, mode, augment))
        return layers

    # ---- statistics -------------------------------------------------------------------------------------
    def _collecting(self) -> bool:
        return self.ema_decay > 0 or self.steps % self.refresh_every == 0

    def _accumulate(self, layer: _Layer, z: torch.Tensor) -> None:
        if not self._collecting():
            return
        moment, rows = layer.input_moment(z)
        acc = self._pending.get(layer)
        if acc is None:
            self._pending[layer] = [moment, rows]
        else:
            acc[0] += moment
            acc[1] += rows

    def _update_factor(self, layer: _Layer, state: dict) -> None:
        pending = self._pending.pop(layer, None)
        if pending is not None:
            moment, rows = pending
            if dist.is_available() and dist.is_initialized():
                packed = torch.cat([moment.flatten(), moment.new_tensor([rows])])
                dist.all_reduce(packed)
                moment, rows = packed[:-1].view_as(moment), packed[-1].item()
            s = moment / rows
            if self.ema_decay > 0 and "ap_stat" in state:
                state["ap_stat"].mul_(self.ema_decay).add_(s, alpha=1 - self.ema_decay)
            else:
                state["ap_stat"] = s
        refresh = (self.steps % self.refresh_every == 0) or "ap_factor" not in state
        if not refresh or "ap_stat" not in state:
            return
        s = state["ap_stat"]
        d = s.shape[0]
        trace = s.diagonal().sum()
        lam = (self.damping * (trace / d if self.damping_form == "mean" else trace) + self.damping_eps).item()
        # A NaN/inf input makes its own diagonal entry of S, hence the trace, non-finite: one scalar check.
        for attempt in range(2 if math.isfinite(lam) else 0):
            factor, info = torch.linalg.cholesky_ex(s + lam * torch.eye(d, dtype=s.dtype, device=s.device))
            if info.item() == 0:
                state["ap_factor"], state["ap_lambda"] = factor, lam
                state["ap_retries"] = state.get("ap_retries", 0) + attempt
                return
            lam *= 10
        state.pop("ap_factor", None)  # no usable factorization: this step uses M = G
        state["ap_fallbacks"] = state.get("ap_fallbacks", 0) + 1

    # ---- the step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ap_grads: dict[torch.Tensor, torch.Tensor] = {}
        if self.ap:
            for layer in self.layers:
                w = layer.weight
                if w.grad is None:
                    continue
                state = self.state[w]
                self._update_factor(layer, state)
                if "ap_factor" not in state:
                    continue
                bias = layer.module.bias if layer.augment else None
                g_bias = bias.grad if bias is not None else None
                if layer.augment and g_bias is None:
                    g_bias = torch.zeros_like(bias)
                m_w, m_b = layer.precondition(state["ap_factor"], w.grad, g_bias)
                ap_grads[w] = m_w
                if layer.augment:
                    ap_grads[bias] = m_b
            self._pending.clear()
        layer_of = {layer.weight: layer for layer in self.layers}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = ap_grads.get(p, p.grad)
                if group["update"] == "adam":
                    self._adamw(p, g, self.state[p], group)
                elif group["update"] == "muon":
                    self._muon(p, g, self.state[p], group, layer_of[p])
                else:
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(g, alpha=-group["lr"])
        self.steps += 1
        return loss

    @staticmethod
    def _adamw(p, g, state, group) -> None:
        """torch.optim.AdamW's single-tensor update, operation for operation."""
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        state["step"] += 1
        step = state["step"]
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)

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

    def health(self, spectrum: bool = False) -> dict[str, float]:
        """Fallback / retry counts; with `spectrum`, per-layer min and max eigenvalue of S_d and its condition."""
        out: dict[str, float] = {"ap_fallbacks": 0, "ap_retries": 0}
        for layer in self.layers:
            state = self.state.get(layer.weight, {})
            out["ap_fallbacks"] += state.get("ap_fallbacks", 0)
            out["ap_retries"] += state.get("ap_retries", 0)
            if spectrum and "ap_factor" in state:
                f = state["ap_factor"]
                eig = torch.linalg.eigvalsh(f @ f.T)
                lo, hi = eig[0].item(), eig[-1].item()
                out[f"ap_eig_min/{layer.name}"] = lo
                out[f"ap_eig_max/{layer.name}"] = hi
                out[f"ap_cond/{layer.name}"] = hi / lo if lo > 0 else math.inf
        return out

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
