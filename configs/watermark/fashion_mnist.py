"""watermark/fashion_mnist: the watermark codec (Zhao et al. 2023) on Fashion-MNIST (Debian's
dataset-fashion-mnist, 60k 28x28 grey images), zero-padded to 32x32 as in configs/diffusion/fashion_mnist.py. The paper's
settings (64 bits, batch 64, Adam 1e-4, ramp to 10) with the wait/ramp halved for a shorter run:
    python train.py --config configs/watermark/fashion_mnist.py --workdir runs/wm_fmnist
"""
from jaxdiff.tasks.watermark_codec import codec_config, locked


def get_config():
    c = codec_config()              # every field with its comment (task watermark_codec)
    c.total_steps = 20_000          # optimizer steps (~21 epochs of 938 steps)
    c.l2_wait = 500                 # steps at l2 = 0 after bit acc first exceeds l2_start_acc (paper: 1000)
    c.l2_ramp = 1_500               # steps of the linear ramp to l2_max (paper: 3000)
    c.checkpoint_every = 2_000      # steps between checkpoints

    c.data.source = 'fashion_mnist' # Debian's dataset-fashion-mnist idx files (data.path overrides the folder)
    c.data.resolution = 32          # zero-pad 28 -> 32 (0 = native 28x28, also supported)
    return locked(c)
