"""The CPU float32 few-rows matmul kernel against XLA's own product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cpu_float_matmul import MAX_ROWS, TARGET, TRANSPOSED_TARGET, cpu_float_matmul

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


@pytest.fixture(scope="module", autouse=True)
def kernel(cpu_kernels_built):
    pass


# (in, out): the default model's products, and widths off multiples of 4, 16 and the 64-row chunks
SHAPES = [(576, 960), (1536, 576), (576, 3072), (64, 344), (172, 64), (33, 5), (7, 17), (130, 200)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_xla(shape):
    k, n = shape
    rng = np.random.default_rng(k * n)
    w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((MAX_ROWS, k)).astype(np.float32))
    multiply = jax.jit(cpu_float_matmul)
    assert TARGET in multiply.lower(x, w).as_text()  # the kernel, not XLA's dot
    with jax.default_matmul_precision("highest"):
        expected = np.asarray(jax.jit(jnp.matmul)(x, w))
    got = np.asarray(multiply(x, w))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    for rows in range(1, MAX_ROWS):  # each row's sums are the same, bit for bit, in any batch
        np.testing.assert_array_equal(np.asarray(multiply(x[:rows], w)), got[:rows])


@pytest.mark.parametrize("shape", [(576, 49152), *SHAPES], ids=lambda s: "x".join(map(str, s)))
def test_transposed_kernel_matches_xla(shape):
    """`x @ w.T` for `w [N, K]` (the tied LM head's layout), for 2 to MAX_ROWS rows."""
    k, n = shape
    rng = np.random.default_rng(k + n)
    w = jnp.asarray(rng.standard_normal((n, k)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((MAX_ROWS, k)).astype(np.float32))
    multiply = jax.jit(lambda x, w: cpu_float_matmul(x, w, transposed=True))
    assert TRANSPOSED_TARGET in multiply.lower(x, w).as_text()
    assert TRANSPOSED_TARGET not in multiply.lower(x[:1], w).as_text()  # one row: XLA's own
    expected = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    got = np.asarray(multiply(x, w))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    for rows in range(2, MAX_ROWS):  # each row's sums are the same, bit for bit, in any batch
        np.testing.assert_array_equal(np.asarray(multiply(x[:rows], w)), got[:rows])
        np.testing.assert_array_equal(np.asarray(multiply(x[::-1][:rows], w)), got[::-1][:rows])


def test_more_rows_and_other_dtypes_are_xla_products():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((MAX_ROWS + 1, 64)).astype(np.float32))
    assert TARGET not in jax.jit(cpu_float_matmul).lower(x, w).as_text()
    transposed = jax.jit(lambda x, w: cpu_float_matmul(x, w, transposed=True))
    assert TRANSPOSED_TARGET not in transposed.lower(x, w.T).as_text()
    np.testing.assert_allclose(np.asarray(transposed(x, w.T)), np.asarray(x @ w), rtol=1e-5, atol=1e-4)
    bf16 = (x[:1].astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert TARGET not in jax.jit(cpu_float_matmul).lower(*bf16).as_text()
    np.testing.assert_array_equal(np.asarray(cpu_float_matmul(*bf16)), np.asarray(bf16[0] @ bf16[1]))


def test_the_engine_decodes_with_the_kernel(stories_path, monkeypatch):
    from test_engine import GOLDEN_FROM_BOS  # HF transformers' greedy tokens

    from jpaged import LLM, SamplingParams, model_runner

    rows = []

    def counted(x, w, transposed=False):
        rows.append((x.shape[0], transposed))
        return cpu_float_matmul(x, w, transposed)

    monkeypatch.setattr(model_runner, "cpu_float_matmul", counted)
    llm = LLM(stories_path, num_blocks=32, compilation_cache=False)
    params = SamplingParams(temperature=0.0, max_tokens=32)
    out = llm.generate({"prompt_token_ids": [1]}, params, use_tqdm=False)
    assert out[0].outputs[0].token_ids == GOLDEN_FROM_BOS
    assert (1, False) in rows  # the one-row decode steps were traced with the kernel
    out = llm.generate([{"prompt_token_ids": [1]}] * 3, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [GOLDEN_FROM_BOS] * 3
    assert (4, True) in rows  # three rows, padded to four: the tied LM head through the transposed kernel
