"""An autoencoder from wherever it comes from, and the decoder a latent diffusion model samples through.

    net, variables, description = load_autoencoder(path)   # an 'autoencoder' train.py run, or a diffusers folder
    decoder = latent_decoder(latent_folder)                  # what sampling decodes a latent model's output with

``description`` (JSON-able: kind, path, step or the weights' sha256, scaling_factor) is stored in latents.json by
``python -m jaxdiff.data.encode``, so a diffusion run trained on those latents can find its decoder again.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff import files
from jaxdiff.data import latents


def load_autoencoder(path: str, *, step: int | None = None) -> tuple[Any, dict, dict]:
    """(AutoencoderKL, variables {'params': tree}, description) from a train.py run of the ``autoencoder`` task
    (its newest checkpoint, or ``step``) or a diffusers VAE folder (config.json + diffusion_pytorch_model.*).
    Raises FileNotFoundError / ValueError with one line naming the problem."""
    from jaxdiff.nets import convert_autoencoder as conv
    from jaxdiff.runs import load_run
    if not os.path.isdir(path):
        raise FileNotFoundError(f'autoencoder {path!r} not found: pass a train.py run of configs/autoencoder/*.py '
                                'or a diffusers AutoencoderKL folder')
    if not os.path.isfile(os.path.join(path, 'config.json')):
        raise FileNotFoundError(f'{path} has no config.json: not a train.py run or a diffusers folder')
    if os.path.isdir(os.path.join(path, 'checkpoints')):
        run = load_run(path, step=step, want='autoencoder')
        description = dict(kind='train_run', path=os.path.abspath(path), step=run.step, scaling_factor=None)
        return run.net, run.variables, description
    net, variables, config = conv.load_diffusers_folder(path)
    weights = next(os.path.join(path, w) for w in conv.WEIGHT_FILES if os.path.isfile(os.path.join(path, w)))
    description = dict(kind='diffusers', path=os.path.abspath(path), sha256=files.sha256(weights),
                       scaling_factor=config.get('scaling_factor'))
    return net, variables, description


class LatentDecoder(NamedTuple):
    """How a model trained on a latent folder becomes images.

    shape: the latents' (h, w, c), where the solver works; image_shape: the decoded (H, W, C);
    variables: the autoencoder's; decode: (variables, x (B, h, w, c) normalised latents) -> images (B, H, W, C) in
    [-1, 1] float32 (jittable); description: provenance for sample manifests.
    """
    shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]
    variables: dict
    decode: Callable[[dict, jax.Array], jax.Array]
    description: dict


def latent_decoder(folder: str) -> LatentDecoder:
    """The decoder of a latent folder's autoencoder (as latents.json records it), undoing its normalisation."""
    meta = latents.read_meta(folder)
    source = meta['autoencoder']
    net, variables, _ = load_autoencoder(source['path'], step=source.get('step'))
    space = latents.space_of(meta)

    def decode(v: dict, x: jax.Array) -> jax.Array:
        z = space.denormalize(x.astype(jnp.float32))
        return net.apply(v, z, method=net.decode).astype(jnp.float32)

    description = dict(latents=os.path.abspath(folder), autoencoder=source, normalization=meta['normalization'])
    return LatentDecoder(tuple(meta['shape']), tuple(meta['image_shape']), variables, decode, description)
