"""gmm2d: a small residual MLP denoiser on the 8-mode 2-D ring mixture (jaxdiff.toy; radius 4, std 0.3).

Points travel as (B, 1, 1, 2) "images" through the normal pipeline; the sample "grid" is a scatter plot.
About 1.5 minutes on 2 CPU cores.
    python train.py --config configs/diffusion/gmm2d.py --workdir runs/gmm2d
"""
from jaxdiff.config import base_config, locked


def get_config():
    c = base_config()
    c.total_steps = 4_000           # ~2 Mimg (points)
    c.checkpoint_every = 1_000      # steps between checkpoints
    c.keep_checkpoints = 2          # recent checkpoints kept
    c.log_every = 200               # steps between progress lines
    c.sample_every = 1_000          # steps between scatter plots

    c.data.source = 'gmm2d'         # 16,384 points drawn once from the ring mixture (jaxdiff.data.gmm2d)
    c.data.use_labels = False       # unconditional (True: condition on the mode, 8 classes)

    c.model.arch = 'mlp'            # jaxdiff.nets.mlp.MLP
    c.model.model_channels = 256    # hidden width
    c.model.num_blocks = 3          # residual blocks
    c.model.dropout = 0.0           # dropout probability
    c.model.sigma_data = 2.85       # data std per coordinate: sqrt(4^2 / 2 + 0.3^2)

    c.loss.augment_p = 0.0          # no image augmentation for points

    c.optim.lr = 2e-3               # Adam learning rate after ramp-up
    c.optim.lr_rampup_img = 100_000  # ~200 steps of ramp-up

    c.ema.halflife_img = 100_000    # EMA half-life in points

    c.sampling.num_images = 2048    # points in each scatter plot
    return locked(c)
