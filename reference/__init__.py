"""The reference CrossFuse: a plain-PyTorch mirror of the released model, the project's oracle.

Installed as ``crossfuse_fast.reference``. ``AutoEncoder()`` and ``FusionNet()`` build the
released architecture with its hyper-parameters; their state dicts carry exactly the keys and
shapes of the authors' checkpoints, which load with ``strict=True``.
"""
from .autoencoder import AutoEncoder
from .functional import attention_ref
from .fusion import FusionNet

__all__ = ["AutoEncoder", "FusionNet", "attention_ref"]
