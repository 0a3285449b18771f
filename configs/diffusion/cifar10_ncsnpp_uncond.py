"""cifar10_ncsnpp_uncond: EDM's unconditional CIFAR-10 NCSN++ (NVlabs/edm `--cond=0 --arch=ncsnpp`).

NCSN++ = SongUNet with Fourier noise embedding, channel_mult_noise 2, residual encoder, resample filter
(1, 3, 3, 1); everything else as configs/diffusion/cifar10_ddpmpp_uncond.py.
    python train.py --config configs/diffusion/cifar10_ncsnpp_uncond.py --workdir runs/cifar10_ncsnpp
"""
from jaxdiff.config import locked, sibling


def get_config():
    c = sibling(__file__, 'cifar10_ddpmpp_uncond')
    c.model.arch = 'ncsnpp'         # EDM --arch=ncsnpp (model_channels 128, channel_mult (2, 2, 2) as ddpmpp)
    return locked(c)
