"""The CPU attention kernel (C++ through XLA's FFI) against the jnp reference, on the awkward batches
the Pallas kernels are tested on, over float and quantized (int8, fp8 e4m3) caches; its row
independence; its checks of bad metadata; the backend switch; an engine with a quantized cache;
and an engine whose compiler fails, which falls back to the reference.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
import tempfile
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas_kernels import (
    BF16,
    F16,
    F32,
    assert_matches_reference,
    attention_program,
    awkward_seqs,
    make_batch,
    quantized,
    run_jitted,
)
from tiers import sampled

from jpaged import LLM, SamplingParams
from pallas_kernels import cpu_paged_attention
from pallas_kernels.backend import select_attention
from pallas_kernels.cpu_paged_attention import cpu_ragged_paged_attention
from pallas_kernels.paged_attention import ragged_paged_attention
from pallas_kernels.quantized_kv import BF16_BITS, QuantizedKV

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


@pytest.fixture(scope="module", autouse=True)
def kernel(cpu_kernels_built):
    pass


KV_DTYPES = ("int8", "fp8_e4m3")


def kernel_output(batch):
    return run_jitted(cpu_ragged_paged_attention, batch)


def calls_kernel(batch) -> bool:
    """Whether the jitted step computes with the kernel, not with the reference in its place."""
    step = attention_program(cpu_ragged_paged_attention, batch.scale, None, ())
    return "jpaged_attention_" in step.lower(*batch.args(), None, None).as_text()


# (block_size, heads, kv_heads, head_dim): GQA groups 1, 3, 4, 8; head_dims on the vector path
# (multiples of 16) and off it (8, 40); block sizes smaller and larger than the 16 keys scored at once.
SHAPES = [(16, 9, 3, 64), (16, 8, 8, 32), (8, 8, 2, 64), (32, 16, 4, 128), (16, 8, 1, 40), (4, 4, 2, 8),
          (16, 12, 4, 80)]


def case_id(case) -> str:
    """`bs16-h9-kv3-d64-float32`: block size, heads, KV heads, head size, then the dtypes."""
    shape, *dtypes = case
    return "-".join(["bs{}-h{}-kv{}-d{}".format(*shape), *(d if isinstance(d, str) else d.__name__ for d in dtypes)])


FLOAT_CASES = [(shape, dtype) for dtype in (F32, BF16, F16) for shape in SHAPES]


# Every shape in float32; bfloat16 and float16 on two each (`--full`: every shape).
@pytest.mark.parametrize(("shape", "dtype"), sampled(FLOAT_CASES, {*range(7), 7, 11, 16, 19}, case_id, unpack=True))
def test_kernel_matches_reference(shape, dtype):
    block_size, heads, kv_heads, head_dim = shape
    seqs = awkward_seqs(block_size, chunk=37)
    batch = make_batch(hash(shape) % 1000, seqs, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       block_size=block_size, num_blocks=160, dtype=dtype)
    assert calls_kernel(batch)
    out = kernel_output(batch)
    assert_matches_reference(out, batch, dtype)
    padding = np.ones(batch.q.shape[0], bool)
    for start, n in zip(np.asarray(batch.md.query_start), np.asarray(batch.md.query_lens)):
        padding[start:start + n] = False
    assert not np.asarray(out, np.float32)[padding].any(), "padding tokens get zeros"


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "bs{}-h{}-kv{}-d{}".format(*s))
def test_bfloat16_cache_kept_as_bits_reads_as_bfloat16(shape):
    """A bfloat16 cache kept as its bits (uint16, as the engine keeps it on CPU) gives the kernel's
    and the reference's results on the bfloat16 cache, bit for bit."""
    block_size, heads, kv_heads, head_dim = shape
    batch = make_batch(hash(shape) % 1000 + 2, awkward_seqs(block_size, chunk=37), num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, num_blocks=160, dtype=BF16)
    bits = dataclasses.replace(batch, k_cache=jax.lax.bitcast_convert_type(batch.k_cache, BF16_BITS),
                               v_cache=jax.lax.bitcast_convert_type(batch.v_cache, BF16_BITS))
    assert calls_kernel(bits)
    np.testing.assert_array_equal(np.asarray(kernel_output(bits), np.float32),
                                  np.asarray(kernel_output(batch), np.float32))
    np.testing.assert_array_equal(np.asarray(run_jitted(ragged_paged_attention, bits), np.float32),
                                  np.asarray(run_jitted(ragged_paged_attention, batch), np.float32))


# Every shape with float32 and bfloat16 queries, float16 queries on the first three, each over
# both cache dtypes; a third of them without `--full`.
QUANTIZED_CASES = [(shape, kv_dtype, dtype) for dtype in (F32, BF16) for shape in SHAPES for kv_dtype in KV_DTYPES] + [
    (shape, kv_dtype, F16) for shape in SHAPES[:3] for kv_dtype in KV_DTYPES]


@pytest.mark.parametrize(("shape", "kv_dtype", "dtype"),
                         sampled(QUANTIZED_CASES, range(0, len(QUANTIZED_CASES), 3), case_id, unpack=True))
def test_kernel_reads_a_quantized_cache(shape, kv_dtype, dtype):
    """int8 or fp8 values with a scale per token and KV head, read by the kernel (no fallback), as
    the reference reads the same cache."""
    block_size, heads, kv_heads, head_dim = shape
    seqs = awkward_seqs(block_size, chunk=37)
    batch = quantized(make_batch(hash(shape) % 1000 + 1, seqs, num_heads=heads, num_kv_heads=kv_heads,
                                 head_dim=head_dim, block_size=block_size, num_blocks=160, dtype=dtype), kv_dtype)
    assert calls_kernel(batch)
    assert_matches_reference(kernel_output(batch), batch, dtype)


@pytest.mark.parametrize("kv_dtype", ("auto", *KV_DTYPES))
def test_long_contexts_and_prompt_tiles(kv_dtype):
    """Contexts of hundreds of blocks, prefill chunks over several query tiles."""
    seqs = [(700, 1), (1500, 1), (0, 300), (900, 129)]
    batch = make_batch(7, seqs, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16, num_blocks=400)
    batch = batch if kv_dtype == "auto" else quantized(batch, kv_dtype)
    assert calls_kernel(batch)
    assert_matches_reference(kernel_output(batch), batch, F32)


@pytest.mark.parametrize("kv_dtype", ("auto", *KV_DTYPES))
def test_each_row_is_independent_of_the_batch(kv_dtype):
    """A row's output is bit for bit the same alone and among other rows (batch invariance)."""
    seqs = [(40, 1), (300, 1), (17, 1), (0, 50), (120, 33)]
    batch = make_batch(11, seqs, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16, num_blocks=120)
    batch = batch if kv_dtype == "auto" else quantized(batch, kv_dtype)
    together = np.asarray(kernel_output(batch))
    md = batch.md
    for row in range(len(seqs)):
        alone = dataclasses.replace(md, query_lens=md.query_lens * (jnp.arange(md.query_lens.shape[0]) == row))
        single = np.asarray(kernel_output(dataclasses.replace(batch, md=alone)))
        start, n = int(md.query_start[row]), int(md.query_lens[row])
        np.testing.assert_array_equal(single[start:start + n], together[start:start + n])


@pytest.mark.parametrize("field,value,message", [
    ("block_tables", 10_000, "block id out of range"),
    ("context_lens", 10_000, "query or context out of range"),
    ("query_start", 10_000, "query or context out of range"),
])
def test_bad_metadata_is_an_error(field, value, message):
    batch = make_batch(3, [(20, 1), (5, 7)], num_heads=4, num_kv_heads=2, head_dim=16, block_size=8, num_blocks=12)
    bad = getattr(batch.md, field).at[0].set(value)
    batch = dataclasses.replace(batch, md=dataclasses.replace(batch.md, **{field: bad}))
    with pytest.raises(Exception, match=message):
        np.asarray(kernel_output(batch))


def test_quantized_cache_scales_of_the_wrong_shape_are_an_error():
    batch = quantized(make_batch(3, [(20, 1), (5, 7)], num_heads=4, num_kv_heads=2, head_dim=16, block_size=8,
                                 num_blocks=12), "int8")
    k_cache = QuantizedKV(batch.k_cache.values, batch.k_cache.scales[:, :, :4])
    with pytest.raises(Exception, match="cache scales must have the caches' shape without head_dim"):
        np.asarray(kernel_output(dataclasses.replace(batch, k_cache=k_cache)))


def test_inside_a_layer_scan_matches_reference():
    """As the model calls it: layer index traced inside `lax.scan`, the caches carried."""
    batch = make_batch(5, [(33, 1), (90, 1), (10, 20)], num_heads=6, num_kv_heads=2, head_dim=32, block_size=16,
                       num_blocks=30)

    def all_layers(attend):
        def run(q, k, v, md):
            def body(total, layer):
                return total + attend(q, k, v, layer, md, batch.scale), None
            return jax.lax.scan(body, jnp.zeros_like(q), jnp.arange(k.shape[0]))[0]
        return jax.jit(run)(batch.q, batch.k_cache, batch.v_cache, batch.md)

    np.testing.assert_allclose(all_layers(cpu_ragged_paged_attention), all_layers(ragged_paged_attention),
                               atol=2e-5, rtol=2e-5)


def test_backend_switch(tmp_path):
    assert select_attention("auto", 64, platform="cpu", kernel_dir=tmp_path) is cpu_ragged_paged_attention
    assert select_attention("cpu", 64, platform="cpu", kernel_dir=tmp_path) is cpu_ragged_paged_attention
    assert select_attention("reference", 64, platform="cpu", kernel_dir=tmp_path) is ragged_paged_attention
    with pytest.raises(ValueError, match="'cpu' cannot run: this platform is 'cuda'"):
        select_attention("cpu", 64, platform="cuda", kernel_dir=tmp_path)
    with pytest.raises(ValueError, match="no folder"):
        select_attention("cpu", 64, platform="cpu")
    with pytest.raises(ValueError, match="does not take float64 queries"):
        select_attention("cpu", 64, platform="cpu", kernel_dir=tmp_path, dtype=np.float64)


def test_engine_reads_a_quantized_cache_with_the_kernel(stories_path, monkeypatch):
    """kv_cache_dtype="int8" on the "cpu" backend: the kernel reads the cache (the reference is never
    traced in its place) and generates the greedy tokens of the reference over the same cache dtype."""
    prompts = ["Once upon a time", "Lily and Ben went to the park to play with a big red ball. They",
               "One day, a little bird"]
    params = SamplingParams(max_tokens=24, temperature=0)

    def greedy(backend):
        llm = LLM(stories_path, kv_cache_dtype="int8", attention_backend=backend, compilation_cache=False)
        assert llm.engine.runner.attention == backend
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]

    expected = greedy("reference")

    def no_fallback(*args):
        raise AssertionError("the CPU kernel fell back to the reference")

    monkeypatch.setattr(cpu_paged_attention, "ragged_paged_attention", no_fallback)
    assert greedy("cpu") == expected


def test_engine_without_a_working_compiler_falls_back(tmp_path, stories_path):
    """A compiler that fails: "auto" warns and generates with the reference, "cpu" is an error."""
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.WARNING)
        from jpaged import LLM, SamplingParams
        backend = sys.argv[1]
        llm = LLM({stories_path!r}, attention_backend=backend, max_model_len=64)
        out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
        print("TOKENS", out[0].outputs[0].token_ids)
    """)
    env = {"CXX": "false", "JPAGED_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(backend):
        return subprocess.run([sys.executable, "-c", script, backend], capture_output=True, text=True, env=env,
                              timeout=300)

    auto = run("auto")
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert "library 'attention-float32-float32' could not be built" in auto.stderr
    assert "using the jnp reference" in auto.stderr
    assert len(ast.literal_eval(auto.stdout.split("TOKENS")[1].strip())) == 8
    forced = run("cpu")
    assert forced.returncode != 0 and "library 'attention-float32-float32' could not be built" in forced.stderr


def test_a_process_builds_only_the_kernels_its_model_runs(tmp_path, stories_path):
    """A float32 model builds the float32 attention pair and the float matmuls, nothing else; an
    int8 KV cache then adds its own attention pair (each library named in the kernels folder)."""
    script = textwrap.dedent(f"""
        import pathlib, sys
        from jpaged import LLM, SamplingParams
        folder = pathlib.Path(sys.argv[1]) / "kernels"
        def built():
            return sorted(p.name.rsplit("-", 1)[0].removeprefix("cpu_kernels-") for p in folder.glob("*.so"))
        for kv in ("auto", "int8"):
            llm = LLM({stories_path!r}, kv_cache_dtype=kv, max_model_len=64, compilation_cache=False)
            assert llm.engine.runner.attention == "cpu"
            llm.generate(["Once upon a time"], SamplingParams(max_tokens=2), use_tqdm=False)
            print(kv, built())
    """)
    env = {**os.environ, "JPAGED_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    floats = "'float-matmul', 'float-matmul-transposed'"
    assert f"auto ['attention-float32-float32', {floats}]" in run.stdout
    assert f"int8 ['attention-float32-float32', 'attention-float32-int8', {floats}]" in run.stdout


def test_a_cache_folder_that_cannot_be_written_builds_in_the_temporary_folder(tmp_path, monkeypatch):
    """A read-only cache does not cost the kernels: they are built in this user's temporary folder
    (once: a second build finds the library there)."""
    from pallas_kernels import cpu_kernels

    if cpu_kernels.compiler() is None:
        pytest.skip("no C++ compiler")
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    built = cpu_kernels._build(blocked / "kernels", "float-matmul")
    assert built.parent == tmp_path / "tmp" / f"jpaged-kernels-{os.getuid()}" and built.is_file()
    stamp = built.stat().st_mtime_ns
    assert cpu_kernels._build(blocked / "kernels", "float-matmul") == built and built.stat().st_mtime_ns == stamp
