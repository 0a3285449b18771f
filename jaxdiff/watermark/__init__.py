"""Watermarking diffusion models (Zhao et al. 2023): the bit-string codec, its training, and embedding one fixed
bit string into every image of a dataset (train the diffusion model on that set, then decode its samples)."""
from jaxdiff.watermark.bits import (all_match, bit_accuracy, bits_to_str, fixed_bits, make_bits, mean_psnr,
                                    parse_bits, psnr)
from jaxdiff.watermark.codec import (WatermarkCodec, WatermarkDecoder, WatermarkEncoder, bitmap_side,
                                     codec_from_config, unet_levels)

__all__ = ['WatermarkCodec', 'WatermarkDecoder', 'WatermarkEncoder', 'all_match', 'bit_accuracy', 'bitmap_side',
           'bits_to_str', 'codec_from_config', 'fixed_bits', 'make_bits', 'mean_psnr', 'parse_bits', 'psnr',
           'unet_levels']
