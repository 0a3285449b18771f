"""Denoiser networks: EDM's SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM), the Diffusion Transformer (DiT,
``dit``); Stable Diffusion's autoencoder (AutoencoderKL, ``autoencoder_kl``); the classifiers of adversarial
training (WideResNet with Swish, PreAct ResNet; ``wide_resnet``, ``preact_resnet``). Flax linen, NHWC.

Call like EDM's torch modules::

    variables = net.init({'params': key}, x, noise_labels, class_labels)
    out = net.apply(variables, x, noise_labels, class_labels, augment_labels=None, train=False,
                    rngs={'dropout': key})        # rngs needed only when train=True

x (B, H, W, C); noise_labels (B,); class_labels (B, label_dim) float one-hot or None; augment_labels
(B, augment_dim) or None. Pass ``variables`` whole: it holds 'params' and, for NCSN++, 'buffers'.

Variable naming (the contract with the torch checkpoint converter):

- ``params``: flattening the tree and joining the path with '.' gives exactly the torch ``state_dict()`` key of
  the same parameter, e.g. ``map_layer0.weight``, ``map_label.bias``, ``enc.32x32_conv.weight``,
  ``enc.16x16_down.conv0.weight``, ``enc.16x16_block0.qkv.bias``, ``enc.16x16_aux_residual.weight``,
  ``dec.4x4_in0.norm2.weight``, ``dec.32x32_aux_norm.bias``, ``out_conv.weight``. The leaf count equals torch's
  ``parameters()`` and nothing else lives there.
- Layouts: conv weight HWIO = torch OIHW ``.transpose(2, 3, 1, 0)``; linear weight (in, out) = torch (out, in)
  ``.T``; biases and GroupNorm weight/bias (C,) as they are.
- ``buffers``: torch buffers that are state, not constants. Only FourierEmbedding's random frequencies:
  ``buffers/map_noise/freqs`` (torch ``map_noise.freqs``), shape (noise_channels // 2,), same layout.
- Torch's ``*.resample_filter`` buffers are constants rebuilt from ``resample_filter`` in code; a converter
  skips them (and may check them against the config).
"""
from jaxdiff.nets.autoencoder_kl import AutoencoderKL
from jaxdiff.nets.dhariwal_unet import DhariwalUNet
from jaxdiff.nets.dit import DiT
from jaxdiff.nets.preact_resnet import PreActResNet, PreActResNet18
from jaxdiff.nets.song_unet import SongUNet
from jaxdiff.nets.wide_resnet import WideResNet, wrn_16_4, wrn_28_10, wrn_70_16

__all__ = ['SongUNet', 'DhariwalUNet', 'DiT', 'AutoencoderKL', 'PreActResNet', 'PreActResNet18', 'WideResNet',
           'wrn_16_4', 'wrn_28_10', 'wrn_70_16']
