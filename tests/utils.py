"""What the parity tests share: the tolerance table, the error measures and the three-way check.

Kernels are judged against a float64 evaluation of their twin. In fp32 (dots pinned to
``input_precision="ieee"``, so the interpreter and a GPU agree) against a fixed tolerance; in 16
bits by the three-way check: the kernel's error must stay within twice PyTorch's own error in the
same dtype, plus a floor from the table, so tolerances follow the dtype by themselves.
"""
import pytest
import torch

TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
"""Largest allowed |kernel - fp64 reference| / max|reference|, per dtype (the floor of the three-way check)."""
INTERPRETER_DTYPES = [torch.float32, torch.float16]  # Triton 3.9's interpreter computes bf16 dots wrongly
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 runs on the GPU machine only")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def relative_error(got: torch.Tensor, expected: torch.Tensor, scale: float | None = None) -> float:
    """max |got - expected| over max |expected| (or over ``scale``, shared by related tensors)."""
    if scale is None:
        scale = expected.double().abs().max().item()
    return (got.double() - expected.double()).abs().max().item() / max(scale, 1e-30)


def common_scale(tensors) -> float:
    """The largest magnitude among related gradients: one of them may be exactly zero in theory
    (dq with a single key, whose softmax is constant), so each is judged against all of them."""
    return max(t.double().abs().max().item() for t in tensors if t is not None)


def assert_three_way(got: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype, *,
                     floor_factor: float = 1, name: str = "") -> None:
    """``got``'s error against ``exact`` (fp64) is at most twice ``plain``'s (PyTorch in ``got``'s
    dtype) plus ``floor_factor`` times the table's floor for ``dtype``."""
    assert relative_error(got, exact) <= 2 * relative_error(plain, exact) + floor_factor * TOLERANCE[dtype], name


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


def check_row_op(triton_fn, torch_fn, rows: int, cols: int, dtype: torch.dtype) -> None:
    """An op on ``(x, residual, weight, bias)`` rows: outputs and every gradient (inputs, weight,
    bias) against fp64, three-way per dtype; the direct call (no gradient) equals the op's. Run it
    under the ``poisoned_allocations`` fixture, so an element a kernel fails to write shows."""
    torch.manual_seed(rows + cols)
    inputs = [torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_()
              for shape in ((rows, cols), (rows, cols), (cols,), (cols,))]
    doubled = [t.detach().double().requires_grad_() for t in inputs]
    got, want, low = triton_fn(*inputs), torch_fn(*doubled), torch_fn(*inputs)
    with torch.no_grad():
        for direct, through_op in zip(triton_fn(*inputs), got):
            assert torch.equal(direct, through_op)
    for g, w, lp in zip(got, want, low):
        assert_three_way(g, w, lp, dtype)
    upstream = [torch.randn(rows, cols, device=DEVICE).to(dtype) for _ in got]

    def grads(outputs, wrt):
        loss = sum((o * u.to(o.dtype)).sum() for o, u in zip(outputs, upstream))
        return torch.autograd.grad(loss, wrt, allow_unused=True)

    for g, w, lp in zip(grads(got, inputs), grads(want, doubled), grads(low, inputs)):
        assert (g is None) == (w is None)
        if g is not None:
            assert_three_way(g, w, lp, dtype, floor_factor=5)


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: records each launch's grid and keyword options, then
    launches the kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def record(*args, **options):
            self.launches.append((grid, options))
            return launch(*args, **options)
        return record
