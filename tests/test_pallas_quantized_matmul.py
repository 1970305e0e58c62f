"""The Pallas weight-only quantized matmul (interpret mode on CPU, compiled on a GPU) against the jnp
reference `quantized_matmul` and a float64 product; its dispatcher; and the kernel
cross-lowered for CUDA, then compiled by Triton for sm_80, sm_89 and sm_90 where the `triton`
package is installed.

Fresh random operands: activations from a normal distribution, int8 weights over the whole range,
fp8 weights from random bytes (every finite float8_e4m3fn value, subnormals and -0 included), a
random scale per output channel and group of 32 inputs (per channel where K is not a multiple of
32). Shapes stay small: interpret mode is slow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiers import FULL

from pallas_kernels.float8 import widen_fp8_bits
from pallas_kernels.pallas_quantized_matmul import (
    MAX_ROWS,
    choose_tiling,
    pallas_quantized_matmul,
    select_quantized_linear,
)
from pallas_kernels.quantized_matmul import GROUP_SIZE, num_groups, quantized_matmul
from pallas_kernels.triton_compile import MAX_SHARED_BYTES, TritonIRNotFound, capture_triton_kernels, compile_kernel

INTERPRET = jax.default_backend() == "cpu"  # on a GPU the kernel runs compiled by Triton
pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")  # exact float32 references on a GPU
# (rtol, atol as a share of the reference's RMS) against the reference. float32: rounding and
# accumulation order only. bfloat16: the reference rounds each scale and each scaled weight to
# bfloat16 (up to 2^-8 of each term, summing at random to about 2^-8 of the RMS, up to 1e-2 of it
# in a test's outputs) and its product; the kernel rounds once.
TOLERANCE = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2e-2, 2e-2)}
# Against a float64 product of the same (exactly representable) operands: the kernel's one rounding.
EXACT_TOLERANCE = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2**-8 + 1e-5, 1e-5)}
FP8_NAN_BYTES = (0x7F, -0x01)  # 0x7F and 0xFF as int8
TRITON_CALL = "custom_call @__gpu$xla.gpu.triton"


def make_operands(seed: int, m: int, n: int, k: int, x_dtype, w_dtype):
    """`x [m, k]`, quantized `w [n, k]` and `scale [n, num_groups(k)]` (float32) with |w * scale| of
    order 1."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    if w_dtype == jnp.int8:
        w, largest = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8), 127.0
    else:
        bits = rng.integers(-128, 128, (n, k)).astype(np.int8)
        bits[np.isin(bits, FP8_NAN_BYTES)] = 0
        w, largest = jax.lax.bitcast_convert_type(jnp.asarray(bits), jnp.float8_e4m3fn), 448.0
    scale = jnp.asarray(rng.uniform(0.5, 1.5, (n, num_groups(k))) / largest, jnp.float32)
    return x, w, scale


def assert_matches_reference(got, x, w, scale):
    want = quantized_matmul(x, w, scale)
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    rtol, atol = TOLERANCE[x.dtype.type]
    rms = float(np.sqrt(np.mean(want**2)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * rms)
    (n, k), groups = w.shape, scale.shape[1]
    weight = np.asarray(w, np.float64).reshape(n, groups, k // groups) * np.asarray(scale, np.float64)[..., None]
    exact = np.asarray(x, np.float64) @ weight.reshape(n, k).T
    rtol, atol = EXACT_TOLERANCE[x.dtype.type]
    np.testing.assert_allclose(got, exact, rtol=rtol, atol=atol * rms)  # an oracle no one here wrote


@pytest.mark.parametrize("m", [1, pytest.param(3, marks=FULL), pytest.param(16, marks=FULL), 33])
@pytest.mark.parametrize("k", [224, 200], ids=["grouped", "per-channel"])
@pytest.mark.parametrize("w_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_matches_reference(x_dtype, w_dtype, k, m):
    """N = 100 and K (7 groups of 32, or 200: one scale a row) are multiples of no default tile;
    M = 1 also splits K."""
    x, w, scale = make_operands(m, m, 100, k, x_dtype, w_dtype)
    assert scale.shape == (100, 7 if k == 224 else 1)
    assert_matches_reference(pallas_quantized_matmul(x, w, scale, interpret=INTERPRET), x, w, scale)


@pytest.mark.parametrize("n,k,block_k", [(64, 96, 32), (65, 160, 64), (65, 97, 16)],
                         ids=["grouped-multiples", "grouped-one-past", "per-channel-one-past"])
def test_small_tiles_and_split_k(n, k, block_k):
    """Tiles of 16 columns, K in three splits: whole tiles without masks; one column and half a K
    step past (the last step's second group past K); per channel, one column and one input past."""
    x, w, scale = make_operands(7, 5, n, k, jnp.float32, jnp.int8)
    tiling = choose_tiling(x.shape, w.shape, x.dtype, w.dtype, block_n=16, block_k=block_k, split_k=3)
    assert tiling.splits == 3 and tiling.n_tiles == -(-n // 16)
    got = pallas_quantized_matmul(x, w, scale, interpret=INTERPRET, block_n=16, block_k=block_k, split_k=3)
    assert_matches_reference(got, x, w, scale)


def test_each_group_takes_its_own_scale():
    """A weight of ones whose scales double from group to group, one group per column of x: each
    output is its column's group's scale, so a scale applied to the wrong group shows."""
    k = 4 * GROUP_SIZE
    x = jnp.repeat(jnp.eye(4, dtype=jnp.float32), GROUP_SIZE, axis=1)  # row g: ones over group g
    w = jnp.ones((16, k), jnp.int8)
    scale = jnp.broadcast_to(2.0 ** jnp.arange(4, dtype=jnp.float32), (16, 4)) * jnp.arange(1, 17)[:, None]
    got = pallas_quantized_matmul(x, w, scale, interpret=INTERPRET, block_n=16, block_k=64, split_k=2)
    np.testing.assert_array_equal(np.asarray(got), GROUP_SIZE * np.asarray(scale).T)


def test_fp8_widened_by_integer_arithmetic():
    """The sm_80 route for fp8 weights: all 256 bit patterns widen exactly (NaN to NaN), and the
    kernel on that route matches the reference."""
    bits = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8)
    want = jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(widen_fp8_bits(bits)), np.asarray(want))
    finite = ~np.isnan(np.asarray(want))  # a NaN's sign is not kept by every conversion (XLA on a GPU)
    np.testing.assert_array_equal(np.signbit(np.asarray(widen_fp8_bits(bits)))[finite], np.signbit(np.asarray(want))[finite])
    x, w, scale = make_operands(3, 3, 100, 200, jnp.bfloat16, jnp.float8_e4m3fn)
    assert_matches_reference(pallas_quantized_matmul(x, w, scale, interpret=INTERPRET, native_fp8=False), x, w, scale)


def test_no_rows():
    x, w, scale = make_operands(0, 0, 100, 200, jnp.float32, jnp.int8)
    assert pallas_quantized_matmul(x, w, scale, interpret=INTERPRET).shape == (0, 100)


def test_unsupported_operands_name_the_value_and_the_limit():
    x, w, scale = make_operands(0, 4, 32, 48, jnp.float32, jnp.int8)
    _, w_grouped, scale_grouped = make_operands(0, 4, 32, 64, jnp.float32, jnp.int8)
    x_grouped = jnp.zeros((4, 64), jnp.float32)
    call = functools.partial(pallas_quantized_matmul, interpret=True)
    too_many = jnp.zeros((MAX_ROWS + 1, 48), jnp.float32)
    cases = [
        ((too_many, w, scale), {}, f"{MAX_ROWS + 1} rows; the kernel takes at most {MAX_ROWS}"),
        ((x.astype(jnp.float16), w, scale), {}, "x dtype float16"),
        ((x, w.astype(jnp.int16), scale), {}, "w dtype int16"),
        ((x[:, :40], w, scale), {}, "K = 40"),
        ((x, w[None], scale[None]), {}, "leading axes"),
        ((x, w, scale[:8]), {}, "scale must have shape (32, 1)"),
        ((x, w, scale[:, 0]), {}, "scale must have shape (32, 1) (one per output channel and group of 32 inputs, "
                                 "or per channel where K is not a multiple of 32), got (32,)"),
        ((x_grouped, w_grouped, scale_grouped[:, :1]), {}, "scale must have shape (32, 2)"),
        ((x_grouped, w_grouped, scale_grouped), {"block_k": 16},
         "block_k must be a multiple of 32 (one scale group) where K = 64 has grouped scales, got 16"),
        ((x, w, scale), {"block_n": 24}, "block_n must be a power of two of at least 16, got 24"),
        ((x, w, scale), {"split_k": 0}, "split_k must be at least 1, got 0"),
    ]
    for args, tuning, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call(*args, **tuning)


def uses_kernel(fn, x, w, scale) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(x, w, scale))


def test_dispatcher_takes_the_kernel_up_to_the_bound_only():
    assert select_quantized_linear("cpu") is quantized_matmul
    linear = select_quantized_linear("cpu", interpret=True)
    _, w, scale = make_operands(1, 1, 40, 64, jnp.bfloat16, jnp.int8)
    for m, kernel in ((1, True), (MAX_ROWS, True), (MAX_ROWS + 1, False)):
        x = make_operands(m, m, 40, 64, jnp.bfloat16, jnp.int8)[0]
        assert uses_kernel(linear, x, w, scale) == kernel, m
    x = make_operands(2, MAX_ROWS + 1, 40, 64, jnp.bfloat16, jnp.int8)[0]
    np.testing.assert_array_equal(np.asarray(linear(x, w, scale), np.float32),
                                  np.asarray(quantized_matmul(x, w, scale), np.float32))
    assert not uses_kernel(select_quantized_linear("cpu", interpret=True, max_rows=8), x[:9], w, scale)
    assert not uses_kernel(linear, x[:4].astype(jnp.float16), w, scale)  # operands the kernel does not take


# --- lowered for CUDA, compiled by Triton --------------------------------------------------------

MODEL_SHAPES = {"SmolLM2-135M q_proj": (576, 1536), "Llama-3-8B o_proj": (4096, 4096),
                "Llama-3-8B up_proj": (4096, 14336), "per-channel K = 4100": (4100, 4096)}  # (K, N)


def trace_for_cuda(m: int, k: int, n: int, x_dtype, w_dtype, **options) -> jax.stages.Traced:
    linear = select_quantized_linear("cuda")
    if options:
        linear = functools.partial(pallas_quantized_matmul, **options)
    args = (jax.ShapeDtypeStruct((m, k), x_dtype), jax.ShapeDtypeStruct((n, k), w_dtype),
            jax.ShapeDtypeStruct((n, num_groups(k)), jnp.float32))
    return jax.jit(linear).trace(*args)


@pytest.mark.parametrize("shape", list(MODEL_SHAPES))
def test_model_shapes_cross_lower_for_cuda(shape):
    """The GPU dispatcher's measured choice: bfloat16 activations, up to 64 rows for weights of
    4M elements and more, up to 8 rows for smaller ones; float32 activations never."""
    k, n = MODEL_SHAPES[shape]
    for m in (1, 8, 16, MAX_ROWS, MAX_ROWS + 1):
        for x_dtype, w_dtype in ((jnp.bfloat16, jnp.int8), (jnp.bfloat16, jnp.float8_e4m3fn), (jnp.float32, jnp.int8)):
            stablehlo = trace_for_cuda(m, k, n, x_dtype, w_dtype).lower(lowering_platforms=("cuda",)).as_text()
            kernel = x_dtype == jnp.bfloat16 and (m <= 8 or (m <= MAX_ROWS and k * n >= 4 * 2**20))
            assert stablehlo.count(TRITON_CALL) == kernel, (m, x_dtype, w_dtype)


def triton_kernel(traced: jax.stages.Traced):
    pytest.importorskip("triton")
    try:
        [kernel] = capture_triton_kernels(traced)
    except TritonIRNotFound as error:
        pytest.skip(str(error))
    return kernel


@pytest.mark.parametrize("capability", [pytest.param(80, marks=FULL), pytest.param(89, marks=FULL), 90])
@pytest.mark.parametrize("x_dtype,w_dtype", [(jnp.bfloat16, jnp.int8), (jnp.bfloat16, jnp.float8_e4m3fn),
                                             (jnp.float32, jnp.int8)], ids=["bf16-int8", "bf16-fp8", "f32-int8"])
def test_kernel_compiles_with_triton(x_dtype, w_dtype, capability):
    """What XLA does on a GPU: a cubin that launches, reads the weight in 16-byte loads, spills
    nothing, and multiplies bfloat16 on tensor cores. fp8 widens in hardware from sm_89 on."""
    # the kernel itself (the GPU dispatcher sends float32 activations to XLA)
    options = {"native_fp8": capability >= 89} if w_dtype == jnp.float8_e4m3fn else {"interpret": False}
    for m in (1, MAX_ROWS):
        kernel = triton_kernel(trace_for_cuda(m, 4096, 4096, x_dtype, w_dtype, **options))
        resources = compile_kernel(kernel, capability)
        assert resources.fits, (f"{kernel.name} needs {resources.shared_bytes} bytes of shared memory; "
                                f"sm_{capability} allows {MAX_SHARED_BYTES[capability]}")
        assert resources.spill_bytes == 0, f"{kernel.name} spills {resources.spill_bytes} bytes on sm_{capability}"
        assert resources.wide_loads > 0, f"{kernel.name} reads the weight without 16-byte loads"
        if x_dtype == jnp.bfloat16:
            assert resources.tensor_core_ops > 0, f"{kernel.name} multiplies without tensor cores"
