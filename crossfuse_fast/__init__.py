"""crossfuse-fast: CrossFuse infrared/visible image fusion (Li and Wu, Information Fusion 2024).

``fuse(ir, vis, model=...)`` fuses image pairs; ``CrossFuse`` bundles the two autoencoders and
the fusion network and loads the authors' released checkpoints; ``crossfuse_fast.reference``
is the plain-PyTorch model (docs/model.md), ``crossfuse_fast.fast`` the same weights on the fast
path (docs/fast-path.md) with the Triton kernels of ``crossfuse_fast.kernels``,
``crossfuse_fast.backends`` the choice between them, ``crossfuse_fast.losses`` and
``crossfuse_fast.train`` the two training stages (``crossfuse_fast.distributed`` for many
processes), ``crossfuse_fast.metrics`` the fusion metrics, ``crossfuse_fast.export`` the ONNX
export.
"""
import os as _os

# In a source checkout (PYTHONPATH=., or tests run from the repository root) the subpackages
# ``reference`` and ``kernels`` sit beside this folder; an installed copy has them inside it,
# mapped there by setup.py. Either way they import as ``crossfuse_fast.reference`` and
# ``crossfuse_fast.kernels``, never as top-level modules.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "reference"))
        and _os.path.isfile(_os.path.join(_root, "reference", "fusion.py"))
        and _os.path.isfile(_os.path.join(_root, "setup.py"))):
    __path__.append(_root)

from .api import fuse  # noqa: E402
from .checkpoints import CheckpointError  # noqa: E402
from .model import CrossFuse  # noqa: E402

__all__ = ["CheckpointError", "CrossFuse", "fuse"]
__version__ = "0.1.0"
