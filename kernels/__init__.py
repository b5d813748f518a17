"""Triton kernels of the fast path, installed as ``crossfuse_fast.kernels``.

Each op lives in one file with its kernels, launchers, registered ``crossfuse::`` ops (visible
to ``torch.compile``) and a PyTorch twin of the same signature (``*_torch``) for the CPU path.
Importing this package needs Triton but no GPU; on a CPU the Triton ops run only under
``TRITON_INTERPRET=1`` (set before the first import), which is how the tests run them.
"""
from .attention import (attention, attention_torch, cross_attention, cross_attention_torch, self_attention,
                        self_attention_torch)
from .gelu import bias_gelu, bias_gelu_torch
from .layer_norm import (add_layer_norm, add_layer_norm_to_map, add_layer_norm_to_map_torch, add_layer_norm_torch,
                         layer_norm, layer_norm_from_map, layer_norm_from_map_torch, layer_norm_torch)
from .linear_gelu import linear_gelu, linear_gelu_torch

__all__ = ["add_layer_norm", "add_layer_norm_to_map", "add_layer_norm_to_map_torch", "add_layer_norm_torch",
           "attention", "attention_torch", "bias_gelu", "bias_gelu_torch", "cross_attention", "cross_attention_torch",
           "layer_norm", "layer_norm_from_map", "layer_norm_from_map_torch", "layer_norm_torch", "linear_gelu",
           "linear_gelu_torch", "self_attention", "self_attention_torch"]
