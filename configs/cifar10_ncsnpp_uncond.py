"""cifar10_ncsnpp_uncond: EDM's unconditional CIFAR-10 NCSN++ (NVlabs/edm `--cond=0 --arch=ncsnpp`).

NCSN++ = SongUNet with Fourier noise embedding, channel_mult_noise 2, residual encoder, resample filter
(1, 3, 3, 1); everything else as configs/cifar10_ddpmpp_uncond.py.
    python train.py --config configs/cifar10_ncsnpp_uncond.py --workdir runs/cifar10_ncsnpp
"""
import importlib.util
import os

from jaxdiff.config import locked


def _base():
    """configs/cifar10_ddpmpp_uncond.py, loaded by path (config files are not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10_ddpmpp_uncond.py')
    spec = importlib.util.spec_from_file_location('_base_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    c = _base().get_config()
    c.unlock()
    c.model.arch = 'ncsnpp'         # EDM --arch=ncsnpp (model_channels 128, channel_mult (2, 2, 2) as ddpmpp)
    return locked(c)
