"""cifar10_ddpmpp_cond: EDM's class-conditional CIFAR-10 DDPM++ (NVlabs/edm `--cond=1 --arch=ddpmpp`; FID 1.79).

Reference recipe: batch 512, Adam lr 1e-3 ramped up over 10 Mimg, EMA half-life 0.5 Mimg with ramp-up ratio 0.05,
dropout 0.13, augment p 0.12, 200 Mimg (390,625 steps; ~2 days on 8xV100). Data: TFDS 'cifar10' (prepare it once
with tfds; read through tfds.data_source, no TensorFlow at train time).
    python train.py --config configs/diffusion/cifar10_ddpmpp_cond.py --workdir runs/cifar10_cond
"""
from jaxdiff.config import base_config, locked

MIMG = 1_000_000


def get_config():
    c = base_config()
    c.data.source = 'tfds'          # TFDS through tfds.data_source (array_record)
    c.data.tfds_name = 'cifar10'    # 32x32x3, 10 classes, 50k train images

    c.sampling.num_images = 100     # 10 per class
    return locked(c)
