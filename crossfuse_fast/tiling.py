"""Fusing images of any size within a bounded memory: the network run on overlapping tiles whose
halos cover its receptive field (docs/tiling.md).

Two passes over tiles of the image. The first encodes each tile with a halo of
:data:`ENCODER_HALO` pixels and keeps only its deep maps (1/64 of the pixels); the cross encoder
then runs on the whole deep maps, a block of windows at a time; the second pass decodes each
output tile, recomputing the shallow maps it needs from the image (the first convolution only).
The stretch to 0..255 is taken last, over the whole image. Works with the reference model and
the fast network alike (both have the parts called here).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .fast.layout import is_channels_last
from .precision import deep_weighting_conditioning
from .reference.functional import WINDOW, minmax_to_255, reflect_pad_extended

DEFAULT_TILE = 1024
"""Side of a tile in pixels, by default: images with a side longer than this run in tiles."""

DEEP_STEP = 8
"""Image pixels per deep pixel: the encoder's three 2 x 2 pools."""

ENCODER_HALO = 32
"""Image pixels a tile reaches beyond the deep pixels it keeps: a deep pixel reads 25 image
pixels beyond its own 8 on each side (docs/tiling.md#the-encoders); rounded up to the pools'
grid so every tile starts on it."""

UPSAMPLE_REACH = 2
"""Deep pixels on each side that an upsampled pixel of the fusion decoder reads
(docs/tiling.md#the-fusion-decoder)."""

SHALLOW_HALO = 1
"""Pixels of shallow map beyond a tile that its weighting reads (the 3 x 3 box filter)."""

WINDOWS_PER_CALL = 64
"""Most cross-encoder windows run in one call in tiles (each window is fused on its own)."""


def check_tile(tile: int | None) -> None:
    """Raise ``ValueError`` unless ``tile`` is ``None`` or a positive multiple of 8."""
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < DEEP_STEP
                             or tile % DEEP_STEP):
        raise ValueError(f"tile must be a multiple of {DEEP_STEP} pixels (at least {DEEP_STEP}) or None, got {tile!r}")


def needs_tiles(height: int, width: int, tile: int | None) -> bool:
    """Whether an image of ``height x width`` runs in tiles of ``tile`` (``None``: never)."""
    return tile is not None and max(height, width) > tile


def _spans(length: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, length)) for start in range(0, length, step)]


def fuse_in_tiles(network: nn.Module, ir: Tensor, vis: Tensor, tile: int = DEFAULT_TILE, *,
                  with_conditioning: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``network(ir, vis)`` computed tile by tile: the same fused images ``[B, 1, H, W]`` up to
    rounding (docs/tiling.md says where), with memory for one tile of ``tile x tile`` pixels plus
    its halo at full resolution, and for the deep maps and the result of the whole image.
    ``with_conditioning``: also the deep weighting's conditioning per image, as
    ``FastCrossFuse.forward_with_conditioning`` gives it.

    ``network`` is a :class:`~crossfuse_fast.CrossFuse` or a :class:`~crossfuse_fast.fast.FastCrossFuse`
    in inference (no gradient); ``ir`` and ``vis`` ``[B, 1, H, W]`` on 0..255, ``H, W >= 8``.
    """
    check_tile(tile)
    height, width = ir.shape[-2:]
    ir_deep = _encode_in_tiles(network.ir_autoencoder, ir, tile)
    vis_deep = _encode_in_tiles(network.vis_autoencoder, vis, tile)
    conditioning = deep_weighting_conditioning(ir_deep, vis_deep) if with_conditioning else None
    fused = _fuse_deep_in_blocks(network.fusion, ir_deep, vis_deep)
    decoder = network.fusion.decoder_fusion
    deep_sum = decoder.deep_sum(fused, ir_deep, vis_deep)
    del fused, ir_deep, vis_deep
    result = None
    for rows in _spans(height, tile):
        for columns in _spans(width, tile):
            block = _decode_tile(network, decoder, deep_sum, ir, vis, rows, columns)
            if result is None:
                # 16-bit maps are stretched in fp32 (crossfuse_fast.precision).
                result = block.new_empty(*block.shape[:2], height, width,
                                         dtype=torch.promote_types(block.dtype, torch.float32))
            result[..., rows[0]:rows[1], columns[0]:columns[1]] = block
    return minmax_to_255(result) if conditioning is None else (minmax_to_255(result), conditioning)


def _encode_in_tiles(autoencoder: nn.Module, images: Tensor, tile: int) -> Tensor:
    """The deep maps of ``autoencoder.encode(images)``, a tile of deep pixels at a time."""
    height, width = images.shape[-2:]
    deep_height, deep_width = height // DEEP_STEP, width // DEEP_STEP
    deep = None
    for top, bottom in _spans(deep_height, tile // DEEP_STEP):
        for left, right in _spans(deep_width, tile // DEEP_STEP):
            # Tiles start on the pools' grid (multiples of 8) and end where the image does when
            # they hold its last deep pixels, so every pool floors as it does on the whole image.
            row0 = max(0, DEEP_STEP * top - ENCODER_HALO)
            column0 = max(0, DEEP_STEP * left - ENCODER_HALO)
            row1 = min(height, DEEP_STEP * bottom + ENCODER_HALO)
            column1 = min(width, DEEP_STEP * right + ENCODER_HALO)
            _, tile_deep = autoencoder.encode(images[..., row0:row1, column0:column1])
            if deep is None:
                layout = torch.channels_last if is_channels_last(tile_deep) else torch.contiguous_format
                deep = torch.empty(*tile_deep.shape[:2], deep_height, deep_width, dtype=tile_deep.dtype,
                                   device=tile_deep.device, memory_format=layout)
            first_row, first_column = row0 // DEEP_STEP, column0 // DEEP_STEP
            deep[..., top:bottom, left:right] = tile_deep[..., top - first_row:bottom - first_row,
                                                          left - first_column:right - first_column]
    return deep


def _fuse_deep_in_blocks(fusion: nn.Module, ir_deep: Tensor, vis_deep: Tensor) -> Tensor:
    """``fusion.fuse_deep(ir_deep, vis_deep)``, at most about :data:`WINDOWS_PER_CALL` windows a
    call: the maps are padded to whole windows once, as the cross encoder pads them, so each block
    of windows needs no padding of its own."""
    batch, _, height, width = ir_deep.shape
    pad_right, pad_bottom = -width % WINDOW, -height % WINDOW
    ir_padded = reflect_pad_extended(ir_deep, 0, pad_right, 0, pad_bottom)
    vis_padded = reflect_pad_extended(vis_deep, 0, pad_right, 0, pad_bottom)
    window_rows, window_columns = (height + pad_bottom) // WINDOW, (width + pad_right) // WINDOW
    columns_per_call = max(1, min(window_columns, WINDOWS_PER_CALL // batch))
    rows_per_call = max(1, WINDOWS_PER_CALL // (batch * columns_per_call))
    fused = torch.empty_like(ir_padded)
    for top, bottom in _spans(window_rows, rows_per_call):
        for left, right in _spans(window_columns, columns_per_call):
            rows, columns = slice(WINDOW * top, WINDOW * bottom), slice(WINDOW * left, WINDOW * right)
            fused[..., rows, columns] = fusion.fuse_deep(ir_padded[..., rows, columns], vis_padded[..., rows, columns])
    return fused[..., :height, :width]


def _reflected(index: Tensor, size: int) -> Tensor:
    """Where a position of a reflection-padded axis of ``size`` reads (one reflection, as
    ``F.pad(mode="reflect")``)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def _upsampled_span(positions: Tensor, deep_size: int) -> tuple[int, int]:
    """The deep pixels whose upsampling gives ``positions`` (of the upsampled axis) exactly."""
    return (max(0, int(positions.min()) // DEEP_STEP - UPSAMPLE_REACH),
            min(deep_size, int(positions.max()) // DEEP_STEP + 1 + UPSAMPLE_REACH))


def _decode_tile(network: nn.Module, decoder: nn.Module, deep_sum: Tensor, ir: Tensor, vis: Tensor,
                 rows: tuple[int, int], columns: tuple[int, int]) -> Tensor:
    """The fused map before the stretch on ``rows x columns`` of the image."""
    height, width = ir.shape[-2:]
    deep_height, deep_width = deep_sum.shape[-2:]
    # The tile and the shallow weighting's halo, in image pixels.
    row0, row1 = max(0, rows[0] - SHALLOW_HALO), min(height, rows[1] + SHALLOW_HALO)
    column0, column1 = max(0, columns[0] - SHALLOW_HALO), min(width, columns[1] + SHALLOW_HALO)
    # The size adjust as an index: image pixel r shows upsampled pixel reflect(r - pad before).
    device = deep_sum.device
    source_rows = _reflected(torch.arange(row0, row1, device=device)
                             - (height - DEEP_STEP * deep_height) // 2, DEEP_STEP * deep_height)
    source_columns = _reflected(torch.arange(column0, column1, device=device)
                                - (width - DEEP_STEP * deep_width) // 2, DEEP_STEP * deep_width)
    top, bottom = _upsampled_span(source_rows, deep_height)
    left, right = _upsampled_span(source_columns, deep_width)
    upsampled = decoder.upsampled(deep_sum[..., top:bottom, left:right])
    y = upsampled.index_select(-2, source_rows - DEEP_STEP * top).index_select(-1, source_columns - DEEP_STEP * left)
    shallow = []
    for autoencoder, images in ((network.ir_autoencoder, ir), (network.vis_autoencoder, vis)):
        # The first convolution reads one pixel beyond: its halo.
        image_top, image_left = max(0, row0 - 1), max(0, column0 - 1)
        maps = autoencoder.shallow(images[..., image_top:min(height, row1 + 1), image_left:min(width, column1 + 1)])
        shallow.append(maps[..., row0 - image_top:row1 - image_top, column0 - image_left:column1 - image_left])
    y = y.contiguous(memory_format=torch.channels_last) if is_channels_last(shallow[0]) else y.contiguous()
    block = decoder.conv_last(decoder.shallow_sum(y, *shallow))
    return block[..., rows[0] - row0:rows[1] - row0, columns[0] - column0:columns[1] - column0]
