"""fashion_mnist_latent_dit: class-conditional Fashion-MNIST in an autoencoder's latent space, with a small DiT.

A DiT-S-like transformer shrunk to train on CPU (width 256, 6 blocks, 4 heads; DiT-S is 384 / 12 / 6), on the
latents of configs/autoencoder/fashion_mnist.py normalised per channel to std 0.5 (EDM2), under EDM's
preconditioning and loss. sample.py decodes its samples through the same autoencoder.
    python train.py --config configs/autoencoder/fashion_mnist.py --workdir runs/ae_fmnist
    python -m jaxdiff.data.encode --autoencoder runs/ae_fmnist --data fashion_mnist --resolution 32 \\
        --out latents/fmnist
    python train.py --config configs/diffusion/fashion_mnist_latent_dit.py --workdir runs/fmnist_ldit \\
        --config.data.path=latents/fmnist
"""
from jaxdiff.config import base_config, locked


def get_config():
    c = base_config()
    c.batch_size = 256              # global batch (60k latents: ~234 steps per epoch)
    c.total_steps = 40_000          # as the pixel-space fashion_mnist config
    c.checkpoint_every = 2_000      # steps between checkpoints
    c.sample_every = 2_000          # steps between (decoded) sample grids

    c.data.source = 'latents'       # a folder of python -m jaxdiff.data.encode
    c.data.path = 'latents/fmnist'  # that folder (set it with --config.data.path)

    c.model.arch = 'dit'            # Diffusion Transformer on 2x2 latent patches (patch_size default)
    c.model.hidden_size = 256       # token width (DiT-S: 384)
    c.model.depth = 6               # transformer blocks (DiT-S: 12)
    c.model.num_heads = 4           # attention heads (DiT-S: 6)
    c.model.label_dropout = 0.1     # CFG training, as DiT's class_dropout_prob

    c.loss.augment_p = 0.0          # DiT takes no augmentation labels

    c.optim.lr = 3e-4               # a small transformer takes a larger step than DiT's 1e-4 at batch 256
    c.optim.lr_rampup_img = 500_000  # ~2k steps of ramp-up

    c.sampling.num_images = 100     # 10 per class, one column per class
    c.sampling.guidance = 1.5       # mild classifier-free guidance for the grids
    return locked(c)
