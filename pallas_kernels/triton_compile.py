"""Compile the Pallas kernels with Triton for a GPU architecture, on a machine without a GPU.

Cross-lowering (`lower(lowering_platforms=("cuda",))`) shows that jax's Pallas lowering accepts a
kernel, but on a GPU XLA then hands the kernel's Triton IR to the Triton compiler, which can
still reject it or build a kernel that cannot launch (more shared memory than the GPU has).
This module takes that last step offline: it captures the Triton IR of every `pallas_call` while
cross-lowering a function, runs it through the `triton` package's compiler (the TTIR passes, as
XLA does, then TTGIR, LLVM, PTX and ptxas) for a chosen compute capability, and reads the
kernel's shared memory, registers and spills from the result.

A developer tool (tests, `scripts/kernel_resources.py`); the engine never imports it. It needs
the optional `triton` package and leans on internals of both jax and Triton, so a new release of
either may need a touch here.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jax

# Largest dynamic shared memory one block may use, by compute capability (CUDA programming
# guide, "Technical Specifications per Compute Capability").
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 64 * 1024
REGISTER_ALLOCATION_UNIT = 256  # registers are handed to a warp in multiples of this
MAX_THREADS_PER_SM = {80: 2048, 86: 1536, 89: 1536, 90: 2048}
SHARED_BYTES_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}

_TRITON_CALL = re.compile(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32')
_MODULE_NAME = re.compile(r"module @([\w$.]+)")
_TENSOR_CORE_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:mma\.sync|wgmma\.mma_async)\b", re.M)
_WIDE_LOAD = re.compile(
    r"^\s*(?:@!?%p\d+\s+)?(?:ld\.global(?:\.[\w:]+)*?\.v4\.b32|cp\.async\.c[ag]\.shared\.global[^;]*, 0x10\b)", re.M)


class TritonIRNotFound(RuntimeError):
    """This jax compiles Pallas kernels itself while lowering, so no Triton IR is left for XLA (and here)."""


@dataclass(frozen=True)
class TritonKernel:
    """One `pallas_call` as XLA would compile it on a GPU: its Triton IR and launch settings."""

    name: str
    ttir: str
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel needs from a streaming multiprocessor."""

    name: str
    capability: int
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int  # per thread
    spill_bytes: int  # spill stores per thread
    tensor_core_ops: int  # mma / wgmma instructions in the PTX (0: matmuls on FMA units)
    wide_loads: int  # 16-byte global loads in the PTX (`ld.global.v4`, 16-byte `cp.async`)

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= MAX_SHARED_BYTES[self.capability]

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM, limited by registers, threads and shared memory (an estimate:
        the hardware also caps blocks per SM and splits registers between its four partitions)."""
        warp_registers = -(-self.registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
        limits = [REGISTERS_PER_SM // (warp_registers * self.num_warps),
                  MAX_THREADS_PER_SM[self.capability] // (32 * self.num_warps)]
        if self.shared_bytes:
            limits.append(SHARED_BYTES_PER_SM[self.capability] // self.shared_bytes)
        return min(limits)


@contextlib.contextmanager
def _recording_triton_modules():
    """Record the text of every Triton module jax's Pallas lowering builds, by module name."""
    from jax._src.pallas.triton import lowering

    lower_to_triton = lowering.lower_jaxpr_to_triton_module
    modules: dict[str, str] = {}

    def recording(*args, **kwargs):
        result = lower_to_triton(*args, **kwargs)
        text = result.module.operation.get_asm()
        modules[_MODULE_NAME.search(text).group(1)] = text
        return result

    lowering.lower_jaxpr_to_triton_module = recording
    try:
        yield modules
    finally:
        lowering.lower_jaxpr_to_triton_module = lower_to_triton


def capture_triton_kernels(traced: jax.stages.Traced) -> list[TritonKernel]:
    """The Triton kernels of a traced function (`jax.jit(f).trace(...)`), lowered for CUDA."""
    jax.clear_caches()  # a cached lowering would not pass through the Pallas lowering again
    with _recording_triton_modules() as modules:
        stablehlo = traced.lower(lowering_platforms=("cuda",)).as_text()
    kernels = {}
    for name, num_stages, num_warps in _TRITON_CALL.findall(stablehlo):
        kernels[name] = TritonKernel(name, modules[name], int(num_warps), int(num_stages))
    if modules and not kernels:
        raise TritonIRNotFound(f"jax {jax.__version__} lowered {len(modules)} Triton kernels but its StableHLO holds no "
                           "'__gpu$xla.gpu.triton' call to read their launch settings from")
    return list(kernels.values())


def compile_kernel(kernel: TritonKernel, capability: int) -> KernelResources:
    """Compile `kernel` with Triton for `capability` (80, 86, 89, 90); raises where Triton rejects it."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, 32)
    options = {"num_warps": kernel.num_warps, "num_stages": kernel.num_stages}
    with tempfile.TemporaryDirectory() as tmp:
        as_lowered, path = Path(tmp) / "lowered.ttir", Path(tmp) / f"{kernel.name}.ttir"
        as_lowered.write_text(kernel.ttir)
        path.write_text(_after_ttir_passes(as_lowered, target, options))
        compiled = triton.compile(str(path), target=target, options=options)
        ptx = compiled.asm["ptx"]
        registers, spill_bytes = _ptxas_usage(ptx, capability, Path(tmp))
    return KernelResources(kernel.name, capability, kernel.num_warps, kernel.num_stages, compiled.metadata.shared,
                           registers, spill_bytes, len(_TENSOR_CORE_OP.findall(ptx)), len(_WIDE_LOAD.findall(ptx)))


def _after_ttir_passes(ttir_path: Path, target, options: dict) -> str:
    """The module in `ttir_path` after Triton's TTIR passes (inlining, combining, loop unrolling, ...).

    `triton.compile` skips them for IR given as text, but XLA runs them on every Pallas kernel.
    """
    from triton._C.libtriton import ir
    from triton.compiler.compiler import IRSource, make_backend

    backend = make_backend(target)
    context = ir.context()
    source = IRSource(str(ttir_path), context, backend)
    parsed = backend.parse_options(options)
    module = source.make_ir(target, parsed, backend.get_codegen_implementation(parsed),
                            backend.get_module_map(), context)
    return str(backend.make_ttir(module, {}, parsed, target.arch))


def _ptxas_usage(ptx: str, capability: int, tmp: Path) -> tuple[int, int]:
    """Registers per thread and spill-store bytes, as ptxas reports them."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptx_path = tmp / "kernel.ptx"
    ptx_path.write_text(ptx)
    report = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                             str(ptx_path), "-o", str(tmp / "kernel.cubin")],
                            capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spill_bytes = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spill_bytes
