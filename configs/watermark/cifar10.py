"""watermark/cifar10: the paper's CIFAR-10 codec (Zhao et al. 2023): 64 bits, batch 64, Adam 1e-4, l2 weight 0
until bit accuracy > 0.9, then 1000 steps wait and a 3000-step ramp to 10; 100 epochs of the 50k training set.
Reads CIFAR-10 through TFDS (prepared offline; nothing downloads at run time) or any 32x32 RGB source:
    python watermark.py train_codec --config configs/watermark/cifar10.py --workdir runs/wm_cifar10
"""
from jaxdiff.watermark.codec_train import base_config, locked


def get_config():
    c = base_config()
    c.seed = 0                      # PRNG seed for init, data order and the random training bits
    c.num_bits = 64                 # bits in the watermark (paper: 64)
    c.batch_size = 64               # images per step (paper: 64)
    c.lr = 1e-4                     # Adam learning rate (paper: 1e-4)
    c.total_steps = 78_200          # optimizer steps (100 epochs of 782 steps, the paper's run)
    c.l2_max = 10.0                 # final weight of the image MSE term (paper: 10)
    c.l2_wait = 1_000               # steps at l2 = 0 after bit acc first exceeds l2_start_acc (paper: 1000)
    c.l2_ramp = 3_000               # steps of the linear ramp to l2_max (paper: 3000)
    c.l2_start_acc = 0.9            # batch bit accuracy that starts the wait-then-ramp schedule (paper: 0.9)
    c.log_every = 500               # steps between progress lines
    c.checkpoint_every = 5_000      # steps between checkpoints

    c.data.source = 'tfds'          # TFDS array_record data source (prepare cifar10 offline first)
    c.data.tfds_name = 'cifar10'    # TFDS dataset name
    c.data.split = 'train'          # the 50k training images
    c.data.resolution = 0           # native 32x32
    c.data.use_labels = True        # keep the class labels in the embedded .npz

    c.model.encoder_widths = (32, 32, 64, 128, 256)  # U-Net: 4 downsamplings 32 -> 2 (paper)
    c.model.decoder_widths = (32, 32, 64, 64, 64, 128, 128)  # decoder conv widths (paper)
    c.model.decoder_strides = (2, 1, 2, 1, 2, 2, 2)  # decoder strides (paper)
    c.model.decoder_hidden = 512    # decoder dense width (paper)
    return locked(c)
