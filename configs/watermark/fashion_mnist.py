"""watermark/fashion_mnist: the watermark codec (Zhao et al. 2023) on Fashion-MNIST (Debian's
dataset-fashion-mnist, 60k 28x28 grey images), zero-padded to 32x32 as in configs/diffusion/fashion_mnist.py. The paper's
settings (64 bits, batch 64, Adam 1e-4, ramp to 10) with the wait/ramp halved for a shorter run:
    python watermark.py train_codec --config configs/watermark/fashion_mnist.py --workdir runs/wm_fmnist
"""
from jaxdiff.watermark.codec_train import base_config, locked


def get_config():
    c = base_config()
    c.seed = 0                      # PRNG seed for init, data order and the random training bits
    c.num_bits = 64                 # bits in the watermark (paper: 64)
    c.batch_size = 64               # images per step (paper: 64)
    c.lr = 1e-4                     # Adam learning rate (paper: 1e-4)
    c.total_steps = 20_000          # optimizer steps (~21 epochs of 938 steps)
    c.l2_max = 10.0                 # final weight of the image MSE term (paper: 10)
    c.l2_wait = 500                 # steps at l2 = 0 after bit acc first exceeds l2_start_acc (paper: 1000)
    c.l2_ramp = 1_500               # steps of the linear ramp to l2_max (paper: 3000)
    c.l2_start_acc = 0.9            # batch bit accuracy that starts the wait-then-ramp schedule (paper: 0.9)
    c.log_every = 500               # steps between progress lines
    c.checkpoint_every = 2_000      # steps between checkpoints

    c.data.source = 'fashion_mnist' # Debian's dataset-fashion-mnist idx files (data.path overrides the folder)
    c.data.split = 'train'          # the 60k training images
    c.data.resolution = 32          # zero-pad 28 -> 32 (0 = native 28x28, also supported)
    c.data.use_labels = True        # keep the class labels in the embedded .npz

    c.model.encoder_widths = (32, 32, 64, 128, 256)  # U-Net: 4 downsamplings 32 -> 2 (paper)
    c.model.decoder_widths = (32, 32, 64, 64, 64, 128, 128)  # decoder conv widths (paper)
    c.model.decoder_strides = (2, 1, 2, 1, 2, 2, 2)  # decoder strides (paper)
    c.model.decoder_hidden = 512    # decoder dense width (paper)
    return locked(c)
