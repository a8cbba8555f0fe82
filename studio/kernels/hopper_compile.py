"""Compile a launcher's Triton kernels for Hopper (sm_90) on a machine without a GPU.

Triton builds down to a cubin with the ptxas it ships, so the CPU can catch what only the
compiler rejects (``tests/test_kernels_compile.py``) and read what each kernel costs in
registers and spills (``bench/diag_registers.py``).  The launches are caught, not run: ``JITFunction.run``
is patched, and each launch's signature is read off its arguments.  Written by hand because
Triton offers no "compile what this call would launch" entry point.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import JITFunction

HOPPER = GPUTarget("cuda", 90, 32)
_DTYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.float8_e4m3fn: "fp8e4nv",
}


def caught_launches(launch: Callable[[], object]) -> list[tuple[JITFunction, tuple, dict]]:
    """The kernel launches ``launch()`` makes (kernel, positional args, keyword args), none run."""
    seen: list[tuple[JITFunction, tuple, dict]] = []

    def catch(self: JITFunction, *args: object, grid: object, warmup: bool, **kwargs: object) -> None:
        if not warmup:  # (a warmup compiles what the launch after it runs: ``cluster_launch``)
            seen.append((self, args, kwargs))

    with mock.patch.object(JITFunction, "run", catch):
        launch()
    return seen


def compile_for_hopper(fn: JITFunction, args: tuple, kwargs: dict) -> object:
    """One caught launch compiled for sm_90; ``.asm["cubin"]`` holds the binary."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = values.get(param.name, param.default)
        if param.is_constexpr or value is None or (type(value) is int and value == 1):
            # (a launch specialises None and an integer argument equal to 1 into constants, too)
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        if isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _DTYPES[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        else:
            signature[param.name] = "i32"
            aligned = int(value) % 16 == 0
        if aligned:  # as a launch does: the hint that lets loads and stores be vectorised
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = (GluonASTSource if fn.is_gluon() else ASTSource)(
        fn, signature, constexprs=constexprs, attrs=attrs
    )
    return triton.compile(source, target=HOPPER, options=options)


def resource_usage(compiled: object) -> dict[str, int]:
    """``cuobjdump``'s resource usage of a compiled kernel: ``REG`` (registers per thread),
    ``STACK`` (bytes per thread, where ptxas spills registers), ``SHARED``, ..."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    found = {}
    for word in usage.split():
        name, _, value = word.partition(":")
        if value.isdigit() and name.isupper():
            found[name] = int(value)
    if "REG" not in found:
        raise RuntimeError(f"no register count in cuobjdump's output: {usage[-200:]}")
    return found
