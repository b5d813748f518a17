"""Triton kernels of the fast path, installed as ``crossfuse_fast.kernels``.

One op family a file, each with its kernels, launchers (``*_fwd`` / ``*_bwd``), registered
``crossfuse::`` ops (:class:`.registry.FusedOp`: fake, backward, visible to ``torch.compile``)
and a PyTorch twin of the same signature (``*_torch``) for the CPU path:

- :mod:`.flash_attention`: ``attention``, ``self_attention``, ``cross_attention`` (the reversed softmax);
- :mod:`.fused_layer_norm`: ``layer_norm``, ``add_layer_norm`` (the residual add fused in);
- :mod:`.window_layer_norm`: ``layer_norm_from_map``, ``add_layer_norm_to_map`` (the cross
  encoder's ends, reading and writing windowed maps by address, :mod:`.windows`);
- :mod:`.gelu`: ``bias_gelu``; :mod:`.gemm_gelu`: ``linear_gelu`` (fc1's GEMM with bias and GELU);
- :mod:`.implicit_gemm_conv`: ``conv2d``, ``conv2d_into``, ``conv2d_pool_into`` (NHWC convolutions,
  padding by address, a 2 x 2 max-pool in the epilogue);
- :mod:`.dense_encoder`: ``dense_encoder`` (the encoder with each dense block in one buffer and each
  pool in a convolution's epilogue, forward and backward: training on the kernels);
- :mod:`.upsample_fold`: ``upsampled_conv`` (a nearest 2x upsampling folded into the 3 x 3 conv after it);
- :mod:`.source_weighting`: ``deep_weighted_sum``, ``shallow_weighted_sum`` (the fusion decoder's weighting,
  the size adjust before the shallow one read by address);
- :mod:`.size_adjust`: ``size_adjust`` (the decoders' size adjust, with the upsampling before it and
  the map added after it, by address);
- :mod:`.minmax_stretch`: ``minmax_to_255`` (the per-image stretch that ends the fusion network),
  ``conv2d_minmax_to_255`` (with its statistics gathered by the convolution before it).

Beside them: :mod:`.registry` (how every op is registered), :mod:`.compiler_options` (what every
launch pins) and :mod:`.compile_inspector` (a development tool, not imported here: the kernels
compiled for sm_90 without a GPU).

Importing this package needs Triton but no GPU; on a CPU the Triton ops run only under
``TRITON_INTERPRET=1`` (set before the first import), which is how the tests run them.
"""
from .dense_encoder import dense_encoder, dense_encoder_torch
from .flash_attention import (attention, attention_torch, cross_attention, cross_attention_torch, self_attention,
                              self_attention_torch)
from .fused_layer_norm import add_layer_norm, add_layer_norm_torch, layer_norm, layer_norm_torch
from .gelu import bias_gelu, bias_gelu_torch
from .gemm_gelu import linear_gelu, linear_gelu_torch
from .implicit_gemm_conv import (conv2d, conv2d_into, conv2d_into_torch, conv2d_pool_into, conv2d_pool_into_torch,
                                 conv2d_torch)
from .minmax_stretch import conv2d_minmax_to_255, conv2d_minmax_to_255_torch, minmax_to_255, minmax_to_255_torch
from .size_adjust import size_adjust, size_adjust_torch
from .source_weighting import (deep_weighted_sum, deep_weighted_sum_torch, shallow_weighted_sum,
                               shallow_weighted_sum_torch)
from .upsample_fold import upsampled_conv, upsampled_conv_torch
from .window_layer_norm import (add_layer_norm_to_map, add_layer_norm_to_map_torch, layer_norm_from_map,
                                layer_norm_from_map_torch)

__all__ = ["add_layer_norm", "add_layer_norm_to_map", "add_layer_norm_to_map_torch", "add_layer_norm_torch",
           "attention", "attention_torch", "bias_gelu", "bias_gelu_torch", "conv2d", "conv2d_into",
           "conv2d_into_torch", "conv2d_minmax_to_255", "conv2d_minmax_to_255_torch", "conv2d_pool_into",
           "conv2d_pool_into_torch", "conv2d_torch", "cross_attention", "cross_attention_torch", "deep_weighted_sum",
           "deep_weighted_sum_torch", "dense_encoder", "dense_encoder_torch", "layer_norm", "layer_norm_from_map",
           "layer_norm_from_map_torch", "layer_norm_torch", "linear_gelu", "linear_gelu_torch", "minmax_to_255",
           "minmax_to_255_torch", "self_attention", "self_attention_torch", "shallow_weighted_sum",
           "shallow_weighted_sum_torch", "size_adjust", "size_adjust_torch", "upsampled_conv",
           "upsampled_conv_torch"]
