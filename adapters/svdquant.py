"""SVDQuant (Li et al. 2024, Nunchaku): a 4-bit linear with a fused 16-bit low-rank branch.

``W x = (W diag(lam)) (x / lam) ~= L1 L2 (x / lam) + Q(R) (x / lam)``: smoothing moves
activation outliers into the weight, a rank-r SVD branch absorbs the weight's large
directions, and only the residual ``R`` is quantized (signed INT4 or FP4 E2M1, groups of
64 along K).  Activations are quantized to FP8 on the fly.  The kernels live in
``studio.kernels``; this file is the quantizer and the ``nn.Module``.

LoRAs attach without re-quantization: their factors are concatenated onto the low-rank
branch (see ``adapters/svdquant_lora.py``) and each has a per-rank strength column, so a
strength change is a vector write and per-sample strengths cost one row lookup.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio import kernels
from studio.kernels import reference as ref

FORMAT_VERSION = 1


@dataclass
class SVDQuantConfig:
    #: Rank of the 16-bit low-rank branch (clamped to min(N, K)).
    rank: int = 32
    #: Residual 4-bit format: "int4" (signed, -7..7) or "fp4" (E2M1).
    fmt: str = "int4"
    #: Smoothing migration strengths searched: lam = span_x^a / span_w^(1-a); None = no smoothing.
    alphas: tuple[float | None, ...] = (None, 0.25, 0.4, 0.5, 0.6, 0.75)
    #: Alternations "low rank = SVD_r(W - Q(R))" after the first split.
    refine_iters: int = 1
    #: Calibration rows (tokens) kept per layer for the alpha search.
    calib_rows: int = 512
    #: The calibrated activation peak is the calibration's largest ``|x * smooth_inv|`` times
    #: this; the large-M path scales activations by it (one read of X) when
    #: ``SVDQuantLinear.use_act_peak`` (opt-in); larger values saturate (``saturated_layers``).
    act_headroom: float = 2.0


def _svd_rank(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [N, r], down [r, K]) with up @ down the best rank-r approximation of w."""
    if rank == 0:
        return w.new_zeros(w.shape[0], 0), w.new_zeros(0, w.shape[1])
    if rank + 16 < min(w.shape) // 2:  # randomized SVD: a few matmuls instead of a full LAPACK SVD
        # Seeded on its own generator state: quantizing the same layer twice gives the same codes.
        with torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(w, q=rank + 16, niter=4)
        vh = v.t()
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _decompose(ws: torch.Tensor, rank: int, fmt: str, iters: int) -> dict[str, torch.Tensor]:
    """Low-rank branch (bf16, as the kernel uses it) + quantized residual of ``ws``."""
    up, down = _svd_rank(ws, rank)
    for it in range(iters + 1):
        up, down = up.to(torch.bfloat16).float(), down.to(torch.bfloat16).float()
        qweight, wscale = ref.quantize_weight(ws - up @ down, fmt)
        if it < iters:
            resid_q = ref.dequantize_weight(qweight, wscale, fmt, ws.shape[1])
            up, down = _svd_rank(ws - resid_q, rank)
    return {"up": up, "down": down, "qweight": qweight, "wscale": wscale}


class SVDQuantLinear(nn.Module):
    """Drop-in for ``nn.Linear``: 4-bit residual + low-rank branch + attached LoRAs."""

    def __init__(self, in_features: int, out_features: int, rank: int, fmt: str, bias: bool) -> None:
        super().__init__()
        if fmt not in ref.FORMATS:
            raise ValueError(f"unknown 4-bit format {fmt!r}; use one of {ref.FORMATS}")
        self.in_features, self.out_features, self.rank, self.fmt = in_features, out_features, rank, fmt
        kg = ref.padded_k(in_features) // ref.GROUP
        self.register_buffer("smooth_inv", torch.ones(in_features))
        self.register_buffer("qweight", torch.zeros(kg, out_features, 32, dtype=torch.uint8))
        self.register_buffer("wscale", torch.zeros(kg, out_features))
        self.register_buffer("svd_down", torch.zeros(rank, in_features, dtype=torch.bfloat16))
        self.register_buffer("svd_up", torch.zeros(out_features, rank, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # The calibrated activation peak (0: none, as in files written before it existed) and
        # the largest one the large-M path has seen since (reset_act_seen).
        self.register_buffer("act_peak", torch.zeros(1))
        self.register_buffer("act_seen", torch.zeros(1), persistent=False)
        self.act_peak_value = 0.0  # a host copy: forward decides without reading the GPU
        #: Whether the large-M path scales activations by ``act_peak`` (when there is one and
        #: the scaling is one per operand) instead of measuring each batch's peak first: X is
        #: read once, but values past the peak saturate, so it is opt-in (docs/quantization.md).
        self.use_act_peak = False
        # Branches fused into l1/l2 (LoRA layers, in attach order) and the composed tensors.
        self._branches: list[Any] = []
        self.register_buffer("l1", torch.zeros(0), persistent=False)
        self.register_buffer("l2", torch.zeros(0), persistent=False)
        self.register_buffer("strength", torch.zeros(0), persistent=False)
        self.calib_error: float | None = None  # relative output error on the calibration rows
        # The large-M path's FP8 scales: None (the default, one per operand) or "row" / "tensor"
        # (studio.kernels.reference_prefill.SCALINGS); "row" for inputs with giant tokens.
        self.prefill_scaling: str | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        calib: torch.Tensor,
        rank: int = 32,
        fmt: str = "int4",
        config: SVDQuantConfig | None = None,
        act_span: torch.Tensor | None = None,
    ) -> SVDQuantLinear:
        """Quantize ``linear`` with calibration activations ``calib [..., in_features]``.

        ``act_span [in_features]``: the largest ``|x|`` of each input channel over all the
        calibration tokens, when ``calib`` holds only a sample of them (``quantize_model``);
        None: taken from ``calib``.  With the smoothing it gives the calibrated peak."""
        cfg = config or SVDQuantConfig(rank=rank, fmt=fmt)
        w = linear.weight.detach().float()
        n, k = w.shape
        if calib.shape[-1] != k:
            raise ValueError(f"calibration activations have {calib.shape[-1]} features; the layer takes {k}")
        x = calib.detach().reshape(-1, k).float().to(w.device)
        if x.shape[0] == 0:
            raise ValueError("no calibration activations: quantizing needs at least one row")
        for what, t in (("weight", w), ("calibration activations", x)):
            if not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"the layer's {what} hold {bad} NaN/inf values; nothing was quantized")
        if act_span is None:
            act_span = x.abs().amax(0)
        elif act_span.shape != (k,) or not bool(torch.isfinite(act_span).all()):
            raise ValueError(f"act_span must be {k} finite values, one per input channel")
        if x.shape[0] > cfg.calib_rows:
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[: cfg.calib_rows]]
        r = min(cfg.rank, n, k)
        y_ref = x @ w.t()
        span_x = x.abs().amax(0).clamp_min(1e-5)
        span_w = w.abs().amax(0).clamp_min(1e-5)
        best: tuple[float, torch.Tensor, dict[str, torch.Tensor]] | None = None
        for alpha in cfg.alphas:
            lam = torch.ones(k, device=w.device)
            if alpha is not None:
                lam = span_x**alpha / span_w ** (1.0 - alpha)
                lam = (lam / (lam.max() * lam.min()).sqrt()).clamp(1e-4, 1e4)
            parts = _decompose(w * lam, r, fmt=cfg.fmt, iters=cfg.refine_iters)
            l1 = (parts["down"] / lam).t()
            y = ref.w4_linear(
                x, 1.0 / lam, parts["qweight"], parts["wscale"], cfg.fmt, l1, parts["up"],
                torch.ones(1, r, device=w.device), 1, None,
            )  # fmt: skip
            err = ((y - y_ref).norm() / y_ref.norm().clamp_min(1e-12)).item()
            if best is None or err < best[0]:
                best = (err, lam, parts)
        assert best is not None
        err, lam, parts = best
        mod = cls(k, n, r, cfg.fmt, linear.bias is not None)
        with torch.no_grad():
            mod.smooth_inv.copy_(1.0 / lam)
            mod.qweight.copy_(parts["qweight"])
            mod.wscale.copy_(parts["wscale"])
            mod.svd_down.copy_(parts["down"] / lam)
            mod.svd_up.copy_(parts["up"])
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach().float())
            peak = (act_span.float().to(lam.device) / lam).amax() * cfg.act_headroom
            mod.set_act_peak(float(peak))
        mod.calib_error = err
        return mod.to(linear.weight.device)

    def set_act_peak(self, peak: float) -> None:
        """Set the calibrated activation peak (0 removes it: each batch's peak is measured)."""
        if not (peak >= 0.0 and peak < float("inf")):
            raise ValueError(f"the activation peak must be finite and >= 0, not {peak}")
        self.act_peak.fill_(peak)
        self.act_peak_value = float(self.act_peak)

    def saturated(self) -> bool:
        """Whether a large-M batch since ``reset_act_seen`` held values above the calibrated
        peak (their FP8 codes saturated at +-448).  Reads the GPU: call it after a job."""
        return self.act_peak_value > 0 and float(self.act_seen) > self.act_peak_value

    def reset_act_seen(self) -> None:
        self.act_seen.zero_()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "act_peak"
        if key not in state_dict:  # written before the calibrated peak existed: none
            state_dict[key] = torch.zeros(1)
        peak = state_dict[key]
        if peak.numel() != 1 or not bool(torch.isfinite(peak).all() and (peak >= 0).all()):
            raise ValueError(f"{key}: a calibrated activation peak must be one finite value >= 0")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.act_peak_value = float(peak.reshape(-1)[0])

    def dequantized_weight(self) -> torch.Tensor:
        """Float32 ``[N, K]`` weight the module stands for (low-rank branch included)."""
        w = ref.dequantize_weight(self.qweight, self.wscale, self.fmt, self.in_features)
        return w * self.smooth_inv[None, :] + self.svd_up.float() @ self.svd_down.float()

    # ------------------------------------------------------------------ branches
    def attach_branch(self, branch: Any) -> None:
        self._branches.append(branch)
        self.rebuild_branch()

    def detach_branch(self, branch: Any) -> None:
        self._branches = [b for b in self._branches if b is not branch]
        self.rebuild_branch()

    def rebuild_branch(self) -> None:
        """Concatenate the SVD branch and every attached LoRA into ``l1``, ``l2``, ``strength``."""
        dev, k, n = self.svd_down.device, self.in_features, self.out_features
        total = self.rank + sum(b.rank for b in self._branches)
        rp = max(16, -(-total // 16) * 16)
        l1 = torch.zeros(k, rp, device=dev, dtype=torch.bfloat16)
        l2 = torch.zeros(n, rp, device=dev, dtype=torch.bfloat16)
        l1[:, : self.rank] = self.svd_down.t()
        l2[:, : self.rank] = self.svd_up
        off = self.rank
        for b in self._branches:
            down, up = b.fused_factors()
            l1[:, off : off + b.rank] = down.t().to(torch.bfloat16)
            l2[:, off : off + b.rank] = up.to(torch.bfloat16)
            b.columns = (off, off + b.rank)
            b.synced_version = b.param_version()
            off += b.rank
        self.l1, self.l2 = l1, l2
        self._prefill_key = None  # a new l1 may reuse the old one's address
        self.strength = torch.zeros(1, rp, device=dev)
        self.strength[:, : self.rank] = 1.0
        for b in self._branches:
            self.write_strength(b, b.current_strength)

    def write_strength(self, branch: Any, value: float | torch.Tensor) -> None:
        """Set one branch's strength columns: a scalar, or a vector ``[S]`` of per-sample values."""
        if branch.param_version() != branch.synced_version:
            return self.rebuild_branch()  # its factors were edited in place (loaded, trained)
        lo, hi = branch.columns
        v = torch.as_tensor(value, dtype=torch.float32, device=self.strength.device).reshape(-1)
        rows = self.strength.shape[0]
        if v.numel() > 1 and rows not in (1, v.numel()):
            raise ValueError(f"per-sample strengths of length {v.numel()} clash with others of length {rows}")
        if v.numel() > rows:
            self.strength = self.strength.expand(v.numel(), -1).contiguous()
        self.strength[:, lo:hi] = v[:, None] if v.numel() > 1 else v
        if self.strength.shape[0] > 1 and all(b.scalar_strength() for b in self._branches):
            self.strength = self.strength[:1].contiguous()

    # ------------------------------------------------------------------ forward
    def _trainable_branches(self) -> bool:
        return torch.is_grad_enabled() and any(b.requires_grad() for b in self._branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.l1.numel() == 0 or any(b.param_version() != b.synced_version for b in self._branches):
            self.rebuild_branch()  # first call, or a LoRA's factors were edited in place
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:  # an empty batch
            return x.new_zeros(*shape[:-1], self.out_features)
        rows_per_sample = max(x2.shape[0] // shape[0], 1) if x.dim() > 1 else 1
        samples = x2.shape[0] // rows_per_sample
        if samples % self.strength.shape[0]:
            raise ValueError(
                f"per-sample strengths have {self.strength.shape[0]} rows but the batch has {samples} samples"
            )
        training = self._trainable_branches()
        strength = self.strength
        if training:  # fused path for the frozen part, autograd-visible branches on top
            strength = torch.zeros_like(self.strength[:1])
            strength[:, : self.rank] = 1.0
        bias = None if self.bias is None else self.bias.float()
        bound, wmax, peaks = self._prefill_factors()
        y = kernels.w4_linear(
            x2, self.smooth_inv, self.qweight, self.wscale, self.fmt, self.l1, self.l2,
            strength, rows_per_sample, bias, bound=bound, wmax=wmax, peaks=peaks, scaling=self.prefill_scaling,
            **self.act_peak_args(),
        )  # fmt: skip
        if training:
            for b in self._branches:
                y = y + b.unfused_delta(x2, rows_per_sample).to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def act_peak_args(self) -> dict[str, torch.Tensor]:
        """``act_peak`` / ``act_seen`` for ``kernels.w4_linear`` when the calibrated peak is used."""
        from studio.kernels import reference_prefill

        scaling = reference_prefill.DEFAULT_SCALING if self.prefill_scaling is None else self.prefill_scaling
        if not (self.use_act_peak and self.act_peak_value > 0 and scaling == "tensor"):
            return {}
        return {"act_peak": self.act_peak, "act_seen": self.act_seen}

    def _prefill_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The large-M path's weight-only factors, recomputed when a tensor they use changes."""
        from studio.kernels import reference_prefill

        key = tuple((t.data_ptr(), t._version) for t in (self.l1, self.l2, self.smooth_inv, self.wscale))
        if getattr(self, "_prefill_key", None) != key:
            wmax = reference_prefill.residual_max(self.wscale, self.fmt)
            self._prefill_cache = (
                reference_prefill.branch_bound(self.l1, self.smooth_inv),
                wmax,
                reference_prefill.weight_peaks(self.l2, wmax),
            )
            self._prefill_key = key
        return self._prefill_cache

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"fmt={self.fmt}, loras={len(self._branches)}"
        )


# ---------------------------------------------------------------------- model level


def _default_forward(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _matches(name: str, targets: list[str] | None) -> bool:
    from adapters.base import name_matches

    return targets is None or any(name_matches(name, t) for t in targets)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calib: Iterable[Any],
    config: SVDQuantConfig | None = None,
    targets: list[str] | None = None,
    forward: Callable[[nn.Module, Any], Any] = _default_forward,
) -> dict[str, float]:
    """Replace the model's ``nn.Linear`` layers (all, or those ``targets`` names) in place.

    ``calib`` yields batches; ``forward(model, batch)`` runs one (default: ``model(*batch)``
    for tuples, ``model(**batch)`` for dicts, ``model(batch)`` otherwise).  Returns the
    relative calibration output error of each quantized layer.
    """
    cfg = config or SVDQuantConfig()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)}
    if not linears:
        raise ValueError("no nn.Linear layer matches the targets")
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    spans: dict[str, torch.Tensor] = {}  # per channel, over every token (the rows are a sample)

    def hook(name: str) -> Callable[..., None]:
        def grab(_mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            span = x.abs().amax(0).cpu() if x.shape[0] else None
            if span is not None:
                spans[name] = span if name not in spans else torch.maximum(spans[name], span)
            gen = torch.Generator().manual_seed(len(seen[name]))
            seen[name].append(
                x[torch.randperm(x.shape[0], generator=gen)[: cfg.calib_rows].to(x.device)].cpu()
            )

        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for batch in calib:
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    done: dict[str, SVDQuantLinear] = {}
    for name, linear in linears.items():
        if not seen[name]:
            continue  # the layer never ran on the calibration data: leave it in high precision
        try:
            done[name] = SVDQuantLinear.from_linear(
                linear, torch.cat(seen[name]).to(linear.weight.device), config=cfg, act_span=spans.get(name)
            )
        except ValueError as err:  # name the layer; no layer is swapped, the model stays as it was
            raise ValueError(f"{name}: {err}") from None
    for name, q in done.items():
        _replace(model, name, q)
    return {name: float(q.calib_error or 0.0) for name, q in done.items()}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_modules(model: nn.Module) -> dict[str, SVDQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDQuantLinear)}


def saturated_layers(model: nn.Module) -> list[str]:
    """Names of the 4-bit layers whose large-M batches held activations above their calibrated
    peak since ``reset_act_seen`` (those values were clipped).  Reads each layer's record from
    the GPU once: call it after a job, not per step."""
    return [n for n, m in quantized_modules(model).items() if m.saturated()]


def save_quantized(model: nn.Module, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``svdquant_model.safetensors`` + ``svdquant_config.json`` for every 4-bit layer."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    mods = quantized_modules(model)
    tensors = {f"{n}.{k}": v.contiguous().cpu() for n, m in mods.items() for k, v in m.state_dict().items()}
    layers = {
        n: {
            "in": m.in_features,
            "out": m.out_features,
            "rank": m.rank,
            "fmt": m.fmt,
            "bias": m.bias is not None,
        }
        for n, m in mods.items()
    }
    cfg = {"format_version": FORMAT_VERSION, "layers": layers, "meta": meta or {}}
    save_file(tensors, str(out / "svdquant_model.safetensors"))
    (out / "svdquant_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def load_quantized(model: nn.Module, directory: str | Path) -> nn.Module:
    """Swap the listed ``nn.Linear`` layers of ``model`` for saved 4-bit layers (in place)."""
    from safetensors.torch import load_file

    src = Path(directory)
    cfg = json.loads((src / "svdquant_config.json").read_text())
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{src}: unsupported svdquant format version {cfg.get('format_version')}")
    tensors = load_file(str(src / "svdquant_model.safetensors"))
    for name, spec in cfg["layers"].items():
        old = model.get_submodule(name)
        if not isinstance(old, (nn.Linear, SVDQuantLinear)) or old.in_features != spec["in"]:
            raise ValueError(f"{src}: layer {name!r} does not match the model ({type(old).__name__})")
        mod = SVDQuantLinear(spec["in"], spec["out"], spec["rank"], spec["fmt"], spec["bias"])
        prefix = name + "."
        mod.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        device = next(iter(old.buffers()), None) if isinstance(old, SVDQuantLinear) else old.weight
        _replace(model, name, mod.to(device.device if device is not None else "cpu"))
    return model


def config_dict(cfg: SVDQuantConfig) -> dict[str, Any]:
    return asdict(cfg)


from adapters import svdquant_lora  # noqa: E402,F401  (registers the LoRA branch for 4-bit layers)
