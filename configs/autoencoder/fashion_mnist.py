"""autoencoder/fashion_mnist: a KL autoencoder (SD's AutoencoderKL, small) on Debian's Fashion-MNIST (60k train
images, 28x28 zero-padded to 32x32) -> 8x8x4 latents (/4), LDM's loss without GAN or perceptual term. About 15
minutes on 2 CPU cores (~110 img/s):
    python train.py --config configs/autoencoder/fashion_mnist.py --workdir runs/ae_fashion_mnist
The final recon_l1 / recon_psnr are measured on the first 1000 images of the held-out test split.
"""
from jaxdiff.config import locked
from jaxdiff.tasks.autoencoder import autoencoder_config


def get_config():
    c = autoencoder_config()        # every field with its comment (task autoencoder)
    c.batch_size = 64               # global batch
    c.total_steps = 1_500           # 96k images, 1.6 epochs
    c.checkpoint_every = 500        # steps between checkpoints
    c.sample_every = 500            # steps between preview grids

    c.data.source = 'fashion_mnist'  # Debian's dataset-fashion-mnist
    c.data.resolution = 32          # 28x28 zero-padded to 32x32: divisible by the /4 downsampling

    c.model.block_out_channels = (16, 32, 64)  # three levels 32 -> 16 -> 8: 8x8x4 latents (1/4 of the pixels);
                                    # narrow at full size, where a CPU spends its time
    c.model.layers_per_block = 1    # one ResNet block per encoder level (two per decoder level)
    c.model.norm_num_groups = 8     # GroupNorm groups dividing the narrow widths

    c.loss.kl_weight = 1e-2         # SD: 1e-6, which lets the latents drift and their posterior noise vanish; a
                                    # latent diffusion model wants unit-scale, smooth latents
    c.optim.lr = 1e-3               # Adam lr (LDM's per-image lr x 64 is 2.9e-4; a run of minutes wants more)
    c.sampling.num_images = 32      # images in each preview grid
    c.eval.split = 'test'           # held-out images for recon_l1 / recon_psnr
    c.eval.num_images = 1_000       # the first 1000 test images
    return locked(c)
