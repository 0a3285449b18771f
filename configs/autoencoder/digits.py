"""autoencoder/digits: a KL autoencoder (SD's AutoencoderKL, small) on scikit-learn's 8x8 digits (1797 images,
embedded), 8x8x1 images -> 4x4x4 latents, LDM's loss without GAN or perceptual term (8x8 leaves a PatchGAN no
patches, and no feature network is needed for the pixels to come back). About 3.5 minutes on 2 CPU cores to a
reconstruction PSNR of ~32 dB:
    python train.py --config configs/autoencoder/digits.py --workdir runs/ae_digits
Digits have one split: the final recon_l1 / recon_psnr are measured on the first 500 training images.
"""
from jaxdiff.config import locked
from jaxdiff.tasks.autoencoder import autoencoder_config


def get_config():
    c = autoencoder_config()        # every field with its comment (task autoencoder)
    c.batch_size = 64               # global batch (1797 images: ~28 steps per epoch)
    c.total_steps = 2_000           # ~71 epochs
    c.checkpoint_every = 1_000      # steps between checkpoints
    c.log_every = 250               # steps between progress lines
    c.sample_every = 1_000          # steps between preview grids

    c.model.block_out_channels = (32, 64)  # two levels: 8x8 -> 4x4 latents (/2)
    c.model.layers_per_block = 1    # one ResNet block per encoder level (two per decoder level)
    c.model.norm_num_groups = 8     # GroupNorm groups dividing the narrow widths

    c.loss.kl_weight = 1e-2         # SD: 1e-6, under which the latents drift (std 2.3 by step 300, 1.1 here) and
                                    # their posterior noise vanishes; latent diffusion wants unit-scale, smooth latents
    c.optim.lr = 1e-3               # Adam lr (LDM's per-image lr x 64 is 2.9e-4; a run of minutes wants more)
    c.sampling.num_images = 32      # images in each preview grid
    return locked(c)
