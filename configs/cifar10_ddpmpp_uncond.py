"""cifar10_ddpmpp_uncond: EDM's unconditional CIFAR-10 DDPM++ (NVlabs/edm `--cond=0 --arch=ddpmpp`; FID 1.97).

Same recipe as configs/cifar10_ddpmpp_cond.py without labels.
    python train.py --config configs/cifar10_ddpmpp_uncond.py --workdir runs/cifar10_uncond
"""
import importlib.util
import os

from jaxdiff.config import locked


def _base():
    """configs/cifar10_ddpmpp_cond.py, loaded by path (config files are not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10_ddpmpp_cond.py')
    spec = importlib.util.spec_from_file_location('_base_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    c = _base().get_config()
    c.unlock()
    c.data.use_labels = False       # EDM --cond=0
    c.sampling.num_images = 64      # 8x8 grid
    return locked(c)
