"""``kernels.fused_layer_norm``: LayerNorm and the residual add fused into it, on token rows."""
import pytest
import torch
from utils import DEVICE, INTERPRETER_DTYPES, check_row_op

from crossfuse_fast import kernels

ROW_OPS = {
    "layer_norm": (lambda x, r, w, b: (kernels.layer_norm(x, w, b, 1e-6),),
                   lambda x, r, w, b: (kernels.layer_norm_torch(x, w, b, 1e-6),)),
    "add_layer_norm": (lambda x, r, w, b: kernels.add_layer_norm(x, r, w, b, 1e-6),
                       lambda x, r, w, b: kernels.add_layer_norm_torch(x, r, w, b, 1e-6)),
}


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 512), (37, 512), (5, 100)])
@pytest.mark.parametrize("op", ROW_OPS)
def test_layer_norms(poisoned_allocations, op, rows, cols, dtype):
    """Outputs and every gradient (inputs, weight, bias) against fp64, three-way per dtype."""
    check_row_op(*ROW_OPS[op], rows, cols, dtype)


def test_layer_norms_name_mismatched_operands():
    """The kernels index every operand by the same offsets, so a short one must be refused, not read past."""
    x, short = torch.randn(3, 8, device=DEVICE), torch.randn(6, device=DEVICE)
    ones = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        kernels.layer_norm(x, short, ones, 1e-6)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        kernels.add_layer_norm(x, x, ones, short, 1e-6)
    with pytest.raises(ValueError, match=r"residual must have the shape of x, \(3, 8\)"):
        kernels.add_layer_norm(x, x[:2], ones, ones, 1e-6)


def test_opcheck():
    torch.manual_seed(11)
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(16, device=DEVICE, requires_grad=True)
    cases = [
        (torch.ops.crossfuse.layer_norm, (x, weight, weight.detach().clone().requires_grad_(), 1e-6)),
        (torch.ops.crossfuse.add_layer_norm, (x, x.detach().clone().requires_grad_(), weight,
                                              weight.detach().clone().requires_grad_(), 1e-6)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
