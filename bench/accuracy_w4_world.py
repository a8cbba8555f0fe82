"""Accuracy of the 4-bit SVDQuant linear on the tiny world's diffusion model (CPU, real activations).

    python bench/accuracy_w4_world.py [--json out.json] [--threads 1]

1. Per layer: the input activations of every ``nn.Linear`` of ``assets/diffusion-tiny``'s UNet
   (what ``quantize_model`` targets) are captured while the pipeline samples world prompts:
   calibration prompts (world data seed 10) and other test prompts and seeds (the held-out
   world test set, seed 2).  Their outlier structure is reported, then the relative error
   ``|y - y64| / |y64|`` on the test rows (bf16-rounded, as the GPU layer sees them) against the
   float64 layer, for bf16, FP8 row-wise, naive 4-bit (rank 0, no smoothing) and SVDQuant
   (rank min(32, min(K, N) // 4)), INT4 and FP4, each in the fused maths and in the large-M
   (``path="prefill"``) maths of ``studio.kernels.w4_linear``, the latter with one FP8 scale
   per operand, the activations' measured per batch (the module's default) or the layer's
   calibrated peak (opt-in; how far the test rows reach past it is reported), and with per-token /
   per-channel scales (``scaling="row"``).
2. End to end: the fp32 pipeline (the honest CPU baseline) against the same pipeline with its
   UNet in bf16, FP8 row-wise (emulated), or quantized by ``adapters.svdquant.quantize_model``
   (rank 32 clamped to min(K, N); calibrated on the UNet calls of the calibration prompts, and
   once on the synthetic batches ``studio quantize`` uses): the UNet's noise-prediction error on
   fp32-trajectory inputs (no drift), PSNR (over all images and of the median image) and mean
   |pixel difference| against the fp32 images, CLIP score and CLIP-judged prompt following (as
   the world build measures it).  SVDQuantLinear has no path switch, so the end-to-end prefill
   rows swap ``studio.kernels.w4_linear`` for a copy with ``path="prefill"`` (and ``scaling``)
   while they run.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accuracy_w4_tables import tables  # noqa: E402

from adapters.svdquant import (  # noqa: E402
    SVDQuantConfig,
    SVDQuantLinear,
    quantize_model,
    quantized_modules,
    saturated_layers,
)
from studio import kernels  # noqa: E402

ATTRS = ("shape", "colour", "background")
KINDS = {  # layer kind -> pattern on the module name (first match wins)
    "attn q/k/v (image tokens)": r"attn1\.to_[qkv]$|attn2\.to_q$",
    "cross-attn k/v (text tokens)": r"attn2\.to_[kv]$",
    "attn out": r"to_out\.0$",
    "ff in (GEGLU)": r"ff\.net\.0\.proj$",
    "ff out": r"ff\.net\.2$",
    "time embedding": r"time_emb",
}


@dataclass
class AccuracyConfig:
    #: World prompts whose sampling steps calibrate the quantizers (world data seed ``calib_seed``).
    calib_prompts: int = 4
    #: Other prompts (held-out world test set) whose activations measure the per-layer error.
    test_prompts: int = 4
    #: World data seed of the calibration prompts.
    calib_seed: int = 10
    #: World data seed of the test / end-to-end prompts (2 is the build's held-out test set).
    test_seed: int = 2
    #: Sampling steps (DPM-Solver++) and classifier-free guidance (the model card's recommendation).
    steps: int = 20
    guidance: float = 7.5
    #: Activation rows kept per layer and per UNet call (random rows, fixed seed).
    rows_per_call: int = 96
    #: Largest rank of the low-rank branch; per layer min(rank, min(K, N) // 4).
    rank: int = 32
    #: Only layers whose name matches this regex (None: every nn.Linear of the UNet).
    layers: str | None = None
    #: End to end: prompts and image seeds (seed s gives prompt i the generator seed s + i).
    e2e_prompts: int = 16
    e2e_seeds: tuple[int, ...] = (0, 1000)
    #: End-to-end variants to run (None: all of ``E2E_VARIANTS``).
    e2e_variants: tuple[str, ...] | None = None
    #: Pipeline folder (None: the shipped ``assets/diffusion-tiny``).
    model: str | None = None


# ---------------------------------------------------------------------------- activations


def world_prompts(n: int, seed: int) -> tuple[list[str], dict[str, np.ndarray]]:
    from studio.world.recipes.common import make_world_data

    data = make_world_data(n, seed, workers=1)
    return data.captions, {a: data.labels[a] for a in ATTRS}


def generate(pipe: Any, prompts: list[str], cfg: AccuracyConfig, seed: int) -> np.ndarray:
    from studio.world.recipes.diffusion import generate as world_generate

    return world_generate(pipe, prompts, cfg.guidance, cfg.steps, seed, "cpu")


def record_unet_calls(pipe: Any, prompts: list[str], cfg: AccuracyConfig, seed: int) -> list[dict]:
    """The UNet's inputs at every sampling step, as ``quantize_model`` calibration batches."""
    from studio.calibration import record_denoiser_calls

    return record_denoiser_calls(pipe, prompts, cfg.steps, seed, guidance=cfg.guidance, chunk=None)


@torch.no_grad()
def capture_linear_inputs(unet: nn.Module, calls: list[dict], names: list[str], rows: int) -> dict:
    """``{name: [rows_kept, K]}`` fp32 input rows of each named linear over the recorded calls."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name: str) -> Callable[..., None]:
        def grab(_mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            gen = torch.Generator().manual_seed(len(seen[name]))
            seen[name].append(x[torch.randperm(x.shape[0], generator=gen)[:rows]].clone())

        return grab

    handles = [unet.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for call in calls:
            unet(**call)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def outlier_stats(x: torch.Tensor) -> dict[str, float]:
    """Per input channel ``amax_t |x[t, k]|``: max / median, and channels above 5x the median."""
    amax = x.abs().amax(0)
    med = amax.median().clamp_min(1e-12)
    return {"max_over_median": float(amax.max() / med), "channels_over_5x": int((amax > 5 * med).sum())}


# ---------------------------------------------------------------------------- one layer


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def fp8_rowwise(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """FP8 e4m3 ``_scaled_mm`` maths: activations scaled per token, weights per output channel."""
    sx = (x.float().abs().amax(1, keepdim=True) / 448.0).clamp_min(1e-12)
    sw = (w.float().abs().amax(1, keepdim=True) / 448.0).clamp_min(1e-12)
    xq = (x.float() / sx).to(torch.float8_e4m3fn).float() * sx
    wq = (w.float() / sw).to(torch.float8_e4m3fn).float() * sw
    y = xq @ wq.t() + (b.float() if b is not None else 0.0)
    return y.to(x.dtype)


#: Kernel paths measured, as ``studio.kernels.w4_linear`` options (they override the module's):
#: the large-M path with one FP8 scale per operand, the activations' measured on each batch
#: (``prefill``, the module's default) or the layer's calibrated peak (``prefill_peak``, the
#: module's opt-in ``use_act_peak``), and with per-token / per-channel scales.
PATH_OPTIONS: dict[str, dict[str, Any]] = {
    "auto": {},
    "fused": {"path": "fused"},
    "prefill": {"path": "prefill", "act_peak": None, "act_seen": None},
    "prefill_peak": {"path": "prefill"},
    "prefill_row": {"path": "prefill", "scaling": "row", "act_peak": None, "act_seen": None},
}


def w4_apply(q: SVDQuantLinear, x: torch.Tensor, path: str) -> torch.Tensor:
    q.rebuild_branch()
    bias = None if q.bias is None else q.bias.float()
    return kernels.w4_linear(
        x, q.smooth_inv, q.qweight, q.wscale, q.fmt, q.l1, q.l2, q.strength, 1, bias,
        **{"act_peak": q.act_peak, "act_seen": q.act_seen, **PATH_OPTIONS[path]},
    )  # fmt: skip


def naive_config(fmt: str) -> SVDQuantConfig:
    return SVDQuantConfig(rank=0, fmt=fmt, alphas=(None,), refine_iters=0)


@torch.no_grad()
def layer_errors(
    linear: nn.Linear, calib: torch.Tensor, test: torch.Tensor, rank: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Relative error vs the float64 layer on ``test`` (rounded to bf16) for every variant, and
    the spread max/min of the smoothing factors SVDQuant's search picked per format (1: none)."""
    x = test.to(torch.bfloat16)
    w, b = linear.weight.detach().float(), None if linear.bias is None else linear.bias.detach().float()
    y64 = x.double() @ w.double().t() + (b.double() if b is not None else 0.0)
    out = {"bf16": _rel(F.linear(x, w.bfloat16(), None if b is None else b.bfloat16()), y64)}
    out["fp8_rowwise"] = _rel(fp8_rowwise(x, w, b), y64)
    spread: dict[str, float] = {}
    for fmt in kernels.FORMATS:
        for kind, cfg in (("naive", naive_config(fmt)), ("svdq", SVDQuantConfig(rank=rank, fmt=fmt))):
            torch.manual_seed(0)  # the quantizer's randomized SVD draws from the global generator
            q = SVDQuantLinear.from_linear(linear, calib, config=cfg)
            extra = ("prefill_peak", "prefill_row") if kind == "svdq" else ()
            for path in ("fused", "prefill", *extra):
                out[f"{fmt}_{kind}_{path}"] = _rel(w4_apply(q, x, path), y64)
            spread[fmt] = float(q.smooth_inv.max() / q.smooth_inv.min())
            if kind == "svdq":  # how far the test rows reach past the calibrated peak (> 1: clipped)
                out[f"{fmt}_test_peak_over_calibrated"] = float(
                    (x.float() * q.smooth_inv).abs().max() / q.act_peak_value
                )
    return out, spread


def layer_kind(name: str) -> str:
    return next((k for k, pat in KINDS.items() if re.search(pat, name)), "other")


def per_layer(pipe: Any, cfg: AccuracyConfig) -> dict[str, Any]:
    calib_prompts, _ = world_prompts(cfg.calib_prompts, cfg.calib_seed)
    test_prompts, _ = world_prompts(cfg.test_prompts, cfg.test_seed)
    calib_calls = record_unet_calls(pipe, calib_prompts, cfg, seed=0)
    test_calls = record_unet_calls(pipe, test_prompts, cfg, seed=500)
    names = [
        n
        for n, m in pipe.unet.named_modules()
        if isinstance(m, nn.Linear) and (cfg.layers is None or re.search(cfg.layers, n))
    ]
    calib = capture_linear_inputs(pipe.unet, calib_calls, names, cfg.rows_per_call)
    test = capture_linear_inputs(pipe.unet, test_calls, names, cfg.rows_per_call)
    rows = []
    for name in names:
        lin = pipe.unet.get_submodule(name)
        k, n = lin.in_features, lin.out_features
        rank = min(cfg.rank, min(k, n) // 4)
        row = {"layer": name, "kind": layer_kind(name), "K": k, "N": n, "rank": rank, "rows": len(test[name])}
        row.update(outlier_stats(test[name]))
        row["errors"], row["smoothing_spread"] = layer_errors(lin, calib[name], test[name], rank)
        rows.append(row)
    gen = torch.Generator().manual_seed(0)
    gauss = outlier_stats(torch.randn(rows[0]["rows"], 128, generator=gen))["max_over_median"]
    kinds = [*KINDS, "other"]
    return {
        "layers": rows,
        "kinds": kinds,
        "gaussian_max_over_median": gauss,
        "calib_calls": len(calib_calls),
    }


# ---------------------------------------------------------------------------- end to end


class FP8RowwiseLinear(nn.Module):
    """An ``nn.Linear`` run with ``fp8_rowwise`` maths (what cuBLAS FP8 would compute)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_rowwise(x.reshape(-1, x.shape[-1]), self.linear.weight, self.linear.bias)
        return y.reshape(*x.shape[:-1], -1)


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, make(mod))
    return model


def bf16_unet(unet: nn.Module) -> nn.Module:
    """The UNet in bf16 (weights and activations); inputs cast in, the output cast back to fp32."""

    def cast(v: Any) -> Any:
        return v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def post(_m: nn.Module, _args: tuple, out: Any) -> Any:
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out

    unet = unet.to(torch.bfloat16)
    unet.register_forward_pre_hook(pre, with_kwargs=True)
    unet.register_forward_hook(post)
    return unet


@contextmanager
def forced_path(path: str) -> Iterator[None]:
    """Make every ``SVDQuantLinear`` run ``path`` (the module calls ``kernels.w4_linear``)."""
    original = kernels.w4_linear
    if PATH_OPTIONS[path]:

        @functools.wraps(original)
        def forced(*args: Any, **kwargs: Any) -> torch.Tensor:
            return original(*args, **{**kwargs, **PATH_OPTIONS[path]})

        kernels.w4_linear = forced
    try:
        yield
    finally:
        kernels.w4_linear = original


# name -> (how the UNet is built, kernel path); quantized ones use rank 32 (clamped to min(K, N)),
# the same weights for both paths (global seed 0 before quantizing; "seed1": seed 1 instead).
E2E_VARIANTS = {
    "fp32 (baseline)": ("fp32", "auto"),
    "bf16 UNet": ("bf16", "auto"),
    "fp8 row-wise UNet": ("fp8", "auto"),
    "int4 naive": ("int4_naive", "fused"),
    "fp4 naive": ("fp4_naive", "fused"),
    "int4 SVDQuant r32 (fused)": ("int4_svdq", "fused"),
    "int4 SVDQuant r32 (prefill)": ("int4_svdq", "prefill"),
    "int4 SVDQuant r32 (prefill, calibrated peak)": ("int4_svdq", "prefill_peak"),
    "fp4 SVDQuant r32 (fused)": ("fp4_svdq", "fused"),
    "fp4 SVDQuant r32 (prefill)": ("fp4_svdq", "prefill"),
    "fp4 SVDQuant r32 (prefill, calibrated peak)": ("fp4_svdq", "prefill_peak"),
    "int4 SVDQuant r32 (prefill, row scales)": ("int4_svdq", "prefill_row"),
    "fp4 SVDQuant r32 (prefill, row scales)": ("fp4_svdq", "prefill_row"),
    "int4 SVDQuant r32 (fused, quantizer seed 1)": ("int4_svdq_seed1", "fused"),
    "int4 SVDQuant r32, synthetic calib (fused)": ("int4_svdq_synth", "fused"),
}


def build_unet(base: nn.Module, how: str, calib_calls: list[dict], cfg: AccuracyConfig) -> nn.Module:
    from studio.commands.quantize import calibration_batches

    unet = copy.deepcopy(base)
    if how == "fp32":
        return unet
    if how == "bf16":
        return bf16_unet(unet)
    if how == "fp8":
        return _swap_linears(unet, FP8RowwiseLinear)
    fmt, kind = how.split("_")[:2]
    qcfg = naive_config(fmt) if kind == "naive" else SVDQuantConfig(rank=cfg.rank, fmt=fmt)
    batches = calibration_batches(unet, 4, seed=0) if how.endswith("synth") else calib_calls
    torch.manual_seed(1 if how.endswith("seed1") else 0)  # the randomized SVD draws from it
    quantize_model(unet, batches, qcfg)
    return unet


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.no_grad()
def unet_error(unet: nn.Module, calls: list[dict], refs: list[torch.Tensor]) -> float:
    """Relative error of the UNet's noise prediction on recorded fp32-trajectory inputs (no drift)."""
    num = den = 0.0
    for call, ref in zip(calls, refs):
        y = unet(**call, return_dict=False)[0].double()
        num, den = num + float((y - ref).pow(2).sum()), den + float(ref.pow(2).sum())
    return math.sqrt(num / den)


def end_to_end(pipe: Any, cfg: AccuracyConfig, calib_calls: list[dict] | None = None) -> dict[str, Any]:
    from studio.world.assets import clip_scorer

    if calib_calls is None:
        calib_calls = record_unet_calls(pipe, world_prompts(cfg.calib_prompts, cfg.calib_seed)[0], cfg, 0)
    prompts, labels = world_prompts(cfg.e2e_prompts, cfg.test_seed)
    all_prompts = prompts * len(cfg.e2e_seeds)
    all_labels = {a: np.tile(v, len(cfg.e2e_seeds)) for a, v in labels.items()}
    eps_calls = record_unet_calls(pipe, prompts, cfg, cfg.e2e_seeds[0])[::4]
    with torch.no_grad():
        eps_refs = [pipe.unet(**c, return_dict=False)[0].double() for c in eps_calls]
    scorer = clip_scorer()
    quiet = {"requires_safety_checker": False} if "requires_safety_checker" in pipe.config else {}
    base_unet, rows, ref_images, ref_pred = pipe.unet, [], None, None
    names = cfg.e2e_variants or tuple(E2E_VARIANTS)
    for name in ("fp32 (baseline)", *[n for n in names if n != "fp32 (baseline)"]):
        how, path = E2E_VARIANTS[name]
        start = time.perf_counter()
        unet = build_unet(base_unet, how, calib_calls, cfg)
        for q in quantized_modules(unet).values():  # the calibrated peak is the layer's opt-in
            q.use_act_peak = path == "prefill_peak"
        built = time.perf_counter() - start
        variant = type(pipe)(**{**pipe.components, "unet": unet}, **quiet)
        variant.set_progress_bar_config(disable=True)
        with forced_path(path):
            start = time.perf_counter()
            images = np.concatenate([generate(variant, prompts, cfg, s) for s in cfg.e2e_seeds])
            seconds = time.perf_counter() - start
            eps_err = unet_error(unet, eps_calls, eps_refs)
        clipped = len(saturated_layers(unet))  # layers whose activations passed their calibrated peak
        pred = scorer.classify(images, ATTRS)
        if ref_images is None:
            ref_images, ref_pred = images, pred
        n = len(images)
        per_image = [psnr(images[i], ref_images[i]) for i in range(n)]
        acc = {a: float((pred[a] == all_labels[a]).mean()) for a in ATTRS}
        acc["all_three"] = float(
            np.mean([all(pred[a][i] == all_labels[a][i] for a in ATTRS) for i in range(n)])
        )
        same = np.mean([all(pred[a][i] == ref_pred[a][i] for a in ATTRS) for i in range(n)])
        rows.append(
            {
                "variant": name,
                "unet_eps_rel_err": eps_err,
                "psnr_db": psnr(images, ref_images),
                "psnr_median_db": float(np.median(per_image)),
                "psnr_per_image_db": per_image,
                "mean_abs_diff": float(np.abs(images.astype(np.float64) - ref_images).mean()),
                "clip_score": float(scorer.clip_score(images, all_prompts).mean()),
                "accuracy": acc,
                "same_labels_as_fp32": float(same),
                "saturated_layers": clipped,
                "build_s": built,
                "generate_s": seconds,
            }
        )
    return {"rows": rows, "images": len(ref_images), "prompts": prompts, "unet_calls": len(eps_calls)}


def run(cfg: AccuracyConfig, end_to_end_too: bool = True) -> dict[str, Any]:
    """Both measurements on ``cfg``; returns plain data (``tables`` formats it)."""
    from studio.world.assets import load_diffusion

    torch.manual_seed(0)
    pipe = load_diffusion(cfg.model)
    result: dict[str, Any] = {"config": asdict(cfg), "per_layer": per_layer(pipe, cfg)}
    if end_to_end_too:
        result["end_to_end"] = end_to_end(pipe, cfg)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calib-prompts", type=int, default=4)
    p.add_argument("--test-prompts", type=int, default=4)
    p.add_argument("--e2e-prompts", type=int, default=16)
    p.add_argument("--e2e-seeds", default="0,1000", help="comma-separated image seeds")
    p.add_argument("--layers", default=None, help="regex on linear names (default: all)")
    p.add_argument("--no-e2e", action="store_true", help="per-layer part only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = AccuracyConfig(
        calib_prompts=args.calib_prompts,
        test_prompts=args.test_prompts,
        steps=args.steps,
        layers=args.layers,
        e2e_prompts=args.e2e_prompts,
        e2e_seeds=tuple(int(s) for s in args.e2e_seeds.split(",")),
    )
    start = time.perf_counter()
    result = run(cfg, end_to_end_too=not args.no_e2e)
    result["seconds"] = time.perf_counter() - start
    print(tables(result))
    print(f"\n({result['seconds']:.0f} s on CPU, {args.threads} thread(s))")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
