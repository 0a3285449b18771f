"""What sample.py samples from: a train.py run directory or a converted EDM checkpoint, as one ``Model``.

- A run directory (``config.json`` + ``checkpoints/``; :func:`jaxdiff.runs.load_run` reads one of any task): the net is
  rebuilt from the saved config and ``dataset_info.json`` (written by train.py; older runs fall back to reading the
  dataset once); the variables are the EMA (or raw) params of the newest checkpoint that verifies, or of ``step``.
- A folder written by ``python -m jaxdiff.nets.convert`` (``net_config.json`` + ``variables/``): the net and the
  reference preconditioning (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond) with the pickle's constants.

Both give the denoiser ``D(x (B,H,W,C), sigma, class_labels (B, label_dim) or None)`` through
``Model.denoiser(variables)``, and the noise range the preconditioning supports (EDM's generate.py clips the
sampler's sigma_min / sigma_max to it). A run trained on a latent folder (``data.source = 'latents'``) samples in
its latent space and decodes through the autoencoder the folder names: its variables are {'model': the net's,
'autoencoder': the decoder's}, ``latent_shape`` is where the solver works and ``decode`` makes the images.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Optional, Union

from jaxdiff import precond
from jaxdiff.denoiser import Denoiser
from jaxdiff.runs import load_run
from jaxdiff.transforms.classifier import LogitsFn, LogProbFn, class_log_prob

class Model(NamedTuple):
    """A network with its variables and how to turn them into a denoiser.

    denoiser: variables -> D(x (B,H,W,C), sigma () or (B,), class_labels (B, label_dim) or None) (jittable).
    sigma_range: (sigma_min, sigma_max) the preconditioning supports.
    description: JSON-able provenance (kind, path, step or source sha256), stored in sample manifests.
    resolution, channels: the images it makes. latent_shape: (h, w, c) of a latent model's solver space (None:
    it samples images directly); decode: (variables, x (B, h, w, c)) -> images (B, H, W, C) in [-1, 1].
    """
    net: Any
    variables: dict
    denoiser: Callable[[dict], Denoiser]
    resolution: int
    channels: int
    label_dim: int
    sigma_range: tuple[float, float]
    description: dict
    latent_shape: Optional[tuple[int, int, int]] = None
    decode: Optional[Callable[[dict, Any], Any]] = None

    @property
    def solver_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the space the solver integrates in: the latents' for a latent model, else the images'."""
        return self.latent_shape or (self.resolution, self.resolution, self.channels)

def load_model(path: str, *, use_ema: bool = True, step: Optional[int] = None) -> Model:
    """A run directory of train.py or a converted EDM checkpoint folder -> Model (see the module docstring).

    use_ema: sample from the EMA params (train.py runs; converted EDM pickles hold the EMA net already).
    step: a train.py checkpoint step (None = the newest usable one).
    Raises FileNotFoundError / ValueError / CheckpointError with one-line messages.
    """
    from jaxdiff.nets import convert
    if not os.path.isdir(path):
        raise FileNotFoundError(f'model directory not found: {path!r}; pass the --workdir of a train.py run or a '
                                'folder written by python -m jaxdiff.nets.convert')
    if os.path.isfile(os.path.join(path, convert.CONFIG_FILE)):
        if step is not None:
            raise ValueError(f'{path} is a converted EDM checkpoint; it has no training steps to choose from')
        return _converted(path)
    return _run(path, use_ema, step)

def _run(workdir: str, use_ema: bool, step: Optional[int]) -> Model:
    from jaxdiff.nets.from_config import denoiser_fn
    from jaxdiff.tasks.sample_grid import sigma_range

    run = load_run(workdir, use_ema=use_ema, step=step, want='denoiser')
    config, net = run.config, run.net
    description = dict(kind='train_run', path=os.path.abspath(workdir), step=run.step,
                       params='ema' if use_ema else 'raw', arch=config.model.arch, precond=config.model.precond)
    if config.data.source != 'latents':
        return Model(net=net, variables=run.variables, denoiser=lambda v: denoiser_fn(config, net, v),
                     resolution=run.info.resolution, channels=run.info.channels, label_dim=net.label_dim,
                     sigma_range=sigma_range(config), description=description)
    from jaxdiff.autoencoders import latent_decoder
    decoder = latent_decoder(config.data.path)
    height, _, channels = decoder.image_shape
    return Model(net=net, variables={'model': run.variables, 'autoencoder': decoder.variables},
                 denoiser=lambda v: denoiser_fn(config, net, v['model']), resolution=height, channels=channels,
                 label_dim=net.label_dim, sigma_range=sigma_range(config),
                 description=dict(description, latent=decoder.description), latent_shape=decoder.shape,
                 decode=lambda v, x: decoder.decode(v['autoencoder'], x))

# Reference preconditioning classes -> (jaxdiff binder, the constants it takes from the pickle's attributes).
_PRECONDS = {
    'EDMPrecond': (precond.edm, ('sigma_data',)),
    'VPPrecond': (precond.vp, ('beta_d', 'beta_min', 'M')),
    'VEPrecond': (precond.ve, ()),
    'iDDPMPrecond': (precond.iddpm, ('M', 'C_1', 'C_2')),
}

def _converted(folder: str) -> Model:
    from jaxdiff.nets import convert
    net, variables, config = convert.load_converted(folder)
    name, kwargs = config.get('precond'), config.get('precond_kwargs') or {}
    if name not in _PRECONDS:
        raise ValueError(f'{folder}: preconditioning {name!r} is not supported for sampling (known: '
                         f'{", ".join(sorted(_PRECONDS))}); convert a full EDM network pickle, not a bare net')
    bind, constants = _PRECONDS[name]
    extra = {k: kwargs[k] for k in constants if k in kwargs}
    channels = int(kwargs.get('img_channels', net.in_channels))
    if name == 'iDDPMPrecond':
        extra['out_channels'] = channels  # the net also predicts variances in its other channels
    label_dim = int(net.label_dim)

    def denoiser(v):
        return bind(net, v, label_dim=label_dim, **extra)

    lo, hi = float(kwargs.get('sigma_min', 0.0)), float(kwargs.get('sigma_max', float('inf')))
    description = dict(kind='edm_checkpoint', path=os.path.abspath(folder), precond=name,
                       source=config.get('source'))
    return Model(net=net, variables=variables, denoiser=denoiser, resolution=int(net.img_resolution),
                 channels=channels, label_dim=label_dim, sigma_range=(lo, hi), description=description)

def noisy_classifier_logits(source: Union[str, tuple], *, sigma_data: Optional[float] = None, use_ema: bool = True,
                            step: Optional[int] = None) -> LogitsFn:
    """logits_fn(x (B,H,W,C), sigma () or (B,)) -> (B, num_classes) of a noise-conditional classifier.

    source: a train.py run directory of task=noisy_classifier (config.json + checkpoints/; the EMA params of the
        newest usable checkpoint, or of ``step``, or the raw params with use_ema=False), or (net, variables) of a
        ``jaxdiff.nets.noisy_classifier.NoisyClassifier``.
    sigma_data: the input scaling's data std (default: the run's config.model.sigma_data; 0.5 for (net, variables)).
    The returned function carries the class count as ``logits_fn.num_classes``.
    """
    from jaxdiff.nets.noisy_classifier import noisy_logits
    if isinstance(source, str):
        run = load_run(source, use_ema=use_ema, step=step, want='noisy_classifier')
        net, variables, sd = run.net, run.variables, run.config.model.sigma_data
    else:
        net, variables = source
        sd = 0.5
    sd = sd if sigma_data is None else sigma_data

    def logits_fn(x, sigma):
        return noisy_logits(net, variables, x, sigma, sigma_data=sd)

    logits_fn.num_classes = net.num_classes
    return logits_fn

def noisy_classifier_log_prob(source: Union[str, tuple], **kwargs) -> LogProbFn:
    """log_prob_fn(x (B,H,W,C), sigma () or (B,), cond (B, num_classes) one-hot) -> (B,) for
    :func:`jaxdiff.transforms.classifier_guidance` (:func:`jaxdiff.transforms.classifier.class_log_prob` of
    :func:`noisy_classifier_logits`; source and kwargs as there)."""
    logits_fn = noisy_classifier_logits(source, **kwargs)
    return class_log_prob(logits_fn, logits_fn.num_classes)
