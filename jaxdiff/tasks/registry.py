"""``config.task`` -> the task object, and ``run(config, workdir)``: what ``python train.py`` calls.

    summary = run(config, workdir)      # trains or resumes any task in workdir

Tasks are imported when asked for, so a run pays only for its own task's imports.
"""
from __future__ import annotations

import importlib

from jaxdiff.engine import loop

TASKS = {
    'denoiser': 'jaxdiff.tasks.denoiser',                      # EDM diffusion model (gmm2d toy included)
    'noisy_classifier': 'jaxdiff.tasks.noisy_classifier',      # p(y | x_sigma, sigma) for classifier guidance
    'adversarial': 'jaxdiff.tasks.adversarial',                # TRADES / PGD-AT with generated data
    'watermark_codec': 'jaxdiff.tasks.watermark_codec',        # watermark encoder / decoder (Zhao et al. 2023)
    'trigger': 'jaxdiff.tasks.trigger',                        # trigger fine-tuning of a conditional denoiser
    'feature_classifier': 'jaxdiff.tasks.feature_classifier',  # the metrics' digits / Fashion-MNIST classifiers
    'autoencoder': 'jaxdiff.tasks.autoencoder',                # Stable Diffusion's KL autoencoder (LDM's loss)
}


def task_name(config) -> str:
    """The config's task ('denoiser' when the config predates the field)."""
    return config.get('task', 'denoiser') or 'denoiser'


def get(name: str):
    """The task object registered as ``name``; ValueError (one line) naming the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f'config.task={name!r} is not a task: use one of {", ".join(TASKS)}')
    return importlib.import_module(TASKS[name]).TASK


def run(config, workdir: str, *, allow_config_change: bool = False, stream=None) -> dict:
    """Train (or resume) ``config`` in ``workdir`` with the engine; returns the engine's summary dict (progress lines
    to ``stream``, default stdout)."""
    return loop.run(get(task_name(config)), config, workdir, allow_config_change=allow_config_change, stream=stream)
