"""The attention-backend switch: what it picks on a CPU and on a GPU, and its fallback."""

from __future__ import annotations

import functools
import logging

import pytest

from pallas_kernels import backend
from pallas_kernels.backend import pallas_paged_attention, select_attention
from pallas_kernels.paged_attention import ragged_paged_attention


@pytest.fixture(autouse=True)
def fresh_fallback_log(monkeypatch):
    monkeypatch.setattr(backend, "_logged_fallbacks", set())


def is_pallas(fn, interpret: bool) -> bool:
    """The Pallas path; its decode kernel (Triton or Mosaic GPU) depends on the device."""
    return (isinstance(fn, functools.partial) and fn.func is pallas_paged_attention
            and fn.keywords.get("interpret") == interpret and set(fn.keywords) <= {"interpret", "decode_kernel"})


def test_cpu_runs_the_reference_unless_pallas_is_asked_for():
    assert select_attention("auto", 64, platform="cpu") is ragged_paged_attention
    assert select_attention("auto", 64, interpret=True, platform="cpu") is ragged_paged_attention
    assert select_attention("reference", 64, platform="cpu") is ragged_paged_attention
    assert is_pallas(select_attention("pallas", 64, interpret=True, platform="cpu"), interpret=True)


def test_gpu_runs_the_kernels():
    assert is_pallas(select_attention("auto", 128, platform="cuda"), interpret=False)
    assert is_pallas(select_attention("pallas", 80, platform="cuda"), interpret=False)
    assert select_attention("reference", 128, platform="cuda") is ragged_paged_attention


def test_pallas_without_gpu_or_interpret_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a GPU or interpret=True"):
        select_attention("pallas", 64, platform="cpu")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="'triton'"):
        select_attention("triton", 64)


@pytest.mark.parametrize("head_dim", [8, 40])
def test_unsupported_head_dim_falls_back_and_logs_once(head_dim, caplog):
    with caplog.at_level(logging.WARNING, logger="jpaged"):
        for _ in range(3):
            assert select_attention("pallas", head_dim, interpret=True) is ragged_paged_attention
            assert select_attention("auto", head_dim, platform="cuda") is ragged_paged_attention
    messages = [r.getMessage() for r in caplog.records if r.name == "jpaged"]
    assert len(messages) == 1
    assert f"head_dim {head_dim}" in messages[0] and "reference" in messages[0]


def test_reference_backend_never_logs_a_fallback(caplog):
    with caplog.at_level(logging.WARNING, logger="jpaged"):
        assert select_attention("reference", 8) is ragged_paged_attention
        assert select_attention("auto", 8, platform="cpu") is ragged_paged_attention
    assert not caplog.records


def test_decode_kernel_override_is_checked(monkeypatch):
    monkeypatch.setenv(backend.DECODE_KERNEL_ENV, "cutlass")
    with pytest.raises(ValueError, match="'cutlass'"):
        backend.choose_decode_kernel("cuda")
    monkeypatch.setenv(backend.DECODE_KERNEL_ENV, "mosaic")
    assert backend.choose_decode_kernel("cuda") == "mosaic"
    assert select_attention("pallas", 64, platform="cuda").keywords["decode_kernel"] == "mosaic"
    assert is_pallas(select_attention("pallas", 64, interpret=True, platform="cpu"), interpret=True)


def test_interpret_mode_keeps_the_triton_decode_kernel(monkeypatch):
    monkeypatch.setenv(backend.DECODE_KERNEL_ENV, "mosaic")
    assert "decode_kernel" not in select_attention("pallas", 64, interpret=True, platform="cpu").keywords
