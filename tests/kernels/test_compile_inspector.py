"""The Triton kernels compiled for real, for an H100/H200 (sm_90), with the ptxas Triton ships.

The other kernel tests run in Triton's interpreter, which never meets the code generator; this
one compiles every kernel the fast encoder launches (forward and backward, fp32 and bf16, on a
padded deep map), the convolutions (forward and backward, and the upsampled one) at the model's
tile shapes, the decoder's weighted sums, size adjust and min-max stretch, in a fresh process
without ``TRITON_INTERPRET``
(``crossfuse_fast.kernels.compile_inspector``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from crossfuse_fast.kernels.compile_inspector import MAX_SHARED_BYTES

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
EXPECTED_KERNELS = {
    "_attention_fwd_kernel", "_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel",
    "_attention_bwd_dq_kernel", "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_layer_norm_map_fwd_kernel",
    "_layer_norm_map_bwd_kernel", "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel", "_linear_gelu_kernel",
    "_conv2d_fwd_kernel", "_conv2d_pool_fwd_kernel", "_conv2d_bwd_input_kernel", "_conv2d_bwd_weight_kernel",
    "_upsampled_conv_fwd_kernel", "_upsampled_conv_bwd_input_kernel", "_upsampled_conv_bwd_weight_kernel",
    "_channel_sum_kernel", "_weighted_sum_kernel", "_minmax_partial_kernel", "_minmax_stretch_kernel",
    "_conv2d_minmax_fwd_kernel", "_size_adjust_fwd_kernel", "_size_adjust_bwd_kernel", "_max_pool_bwd_kernel"}
MEASURED_SPILLS = {("_attention_fwd_kernel", "float32")}
"""Tiles chosen by timing on a GPU although Triton 3.9 spills registers there (bench/NOTES.md)."""


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    if not PTXAS.exists():
        pytest.skip(f"this Triton has no NVIDIA ptxas at {PTXAS}")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # Triton 3.10's default: only a pinned option turns fusion on
    result = subprocess.run([sys.executable, "-m", "crossfuse_fast.kernels.compile_inspector", "--json"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_every_kernel_compiles_for_sm90(compiled):
    assert {row["name"] for row in compiled} == EXPECTED_KERNELS
    assert {row["case"] for row in compiled} == {"float32", "bfloat16"}
    for row in compiled:
        assert 0 < row["registers"] <= 255, row
        assert row["shared_bytes"] <= MAX_SHARED_BYTES, row


def test_16_bit_dots_run_on_tensor_cores(compiled):
    for row in compiled:
        if row["has_dot"] and row["case"] == "bfloat16":
            assert row["tensor_cores"], f"{row['name']} multiplies on the FMA units"


def test_no_register_spills(compiled):
    spilling = {(row["name"], row["case"]): row["stack_bytes"] for row in compiled if row["stack_bytes"]}
    assert set(spilling) <= MEASURED_SPILLS, spilling


def test_every_launch_pins_fp_fusion(compiled):
    """Triton's default for FMA contraction flips from on to off in 3.10; the kernels' fp32 rounding
    must not (kernels/compiler_options.py)."""
    assert [row["name"] for row in compiled if not row["fp_fusion"]] == []
