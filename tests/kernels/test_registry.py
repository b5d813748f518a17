"""``kernels.registry.FusedOp``: the registered op where autograd or the compiler needs it, the
implementation itself everywhere else."""
import pytest
import torch
from utils import DEVICE

from crossfuse_fast.kernels import gelu


def test_fused_op_dispatches_only_where_needed(monkeypatch):
    """Without a gradient to record the call skips the op's dispatch (and gives the same result);
    with one, and under ``torch.compile``, it goes through the registered op."""
    fused = gelu._bias_gelu
    through_op = []
    op = fused.op
    monkeypatch.setattr(fused, "op", lambda *args: through_op.append(1) or op(*args))
    x, bias = torch.randn(3, 8, device=DEVICE), torch.randn(8, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        direct = fused(x, bias)
    assert not through_op
    registered = fused(x, bias)
    assert through_op == [1] and registered.requires_grad and torch.equal(direct, registered.detach())
    with torch.no_grad():
        compiled = torch.compile(lambda x, bias: fused(x, bias), fullgraph=True)(x, bias)
    assert through_op == [1, 1] and torch.equal(compiled, direct)


def test_fused_op_refuses_float64():
    """The kernels take 32- and 16-bit floats; float64 is refused by name, not computed wrongly."""
    x, bias = torch.randn(3, 8, device=DEVICE, dtype=torch.float64), torch.randn(8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match="bias_gelu takes float32, float16 or bfloat16 tensors, not float64"):
        gelu._bias_gelu(x, bias)
