"""``kernels.gelu``: the bias add and exact GELU in one pass, forward and backward."""
import pytest
import torch
from utils import DEVICE, INTERPRETER_DTYPES, check_row_op

from crossfuse_fast import kernels


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 512), (37, 512), (5, 100)])
def test_bias_gelu(poisoned_allocations, rows, cols, dtype):
    """Output and the gradients of x and bias against fp64, three-way per dtype."""
    check_row_op(lambda x, r, w, b: (kernels.bias_gelu(x, b),), lambda x, r, w, b: (kernels.bias_gelu_torch(x, b),),
                 rows, cols, dtype)


def test_bias_gelu_names_a_mismatched_bias():
    x, short = torch.randn(3, 8, device=DEVICE), torch.randn(6, device=DEVICE)
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.bias_gelu(x, short)


def test_opcheck():
    torch.manual_seed(11)
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.crossfuse.bias_gelu, (x, torch.randn(16, device=DEVICE, requires_grad=True)))
