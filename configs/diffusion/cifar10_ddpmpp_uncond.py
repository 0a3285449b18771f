"""cifar10_ddpmpp_uncond: EDM's unconditional CIFAR-10 DDPM++ (NVlabs/edm `--cond=0 --arch=ddpmpp`; FID 1.97).

Same recipe as configs/diffusion/cifar10_ddpmpp_cond.py without labels.
    python train.py --config configs/diffusion/cifar10_ddpmpp_uncond.py --workdir runs/cifar10_uncond
"""
from jaxdiff.config import locked, sibling


def get_config():
    c = sibling(__file__, 'cifar10_ddpmpp_cond')
    c.data.use_labels = False       # EDM --cond=0
    c.sampling.num_images = 64      # 8x8 grid
    return locked(c)
