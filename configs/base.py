"""Defaults shared by every experiment: the DDPM CIFAR-10 recipe (Ho et al. 2020, Appendix B).

Each experiment file imports `get_config` from here and changes a few fields, so every
config has the same key layout. Override any key from the command line:
  python main.py --config=configs/cifar10_ddpm.py --config.training.batch_size=64
"""
import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
  c = ml_collections.ConfigDict()

  c.data = data = ml_collections.ConfigDict()
  data.name = "cifar10"            # fashion_mnist | cifar10 | celeb_a_hq | lsun_church | folder
  data.data_dir = placeholder(str)  # None: the default place
  data.image_size = 32
  data.channels = 3
  data.random_flip = True
  data.num_threads = 4             # reader threads (grain)

  c.model = model = ml_collections.ConfigDict()
  model.name = "unet"              # unet | dit (Peebles & Xie 2023's transformer, models/dit.py)
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.num_classes = 0            # > 0: class-conditional (label embedding + a null label)
  model.label_dropout = 0.0        # training: the null label instead, for guidance (CFG: 0.1)
  model.dtype = "float32"          # compute dtype: float32 | bfloat16 (parameters stay float32)
  model.attention = "auto"         # auto | xla | cudnn (GPU flash attention, bf16) | per_head
  model.remat = False              # recompute activations in the backward pass (less memory)
  model.conv = "auto"              # auto | xla | onednn: CPU kernels (onednn_conv.py, GroupNorm)
  model.upsample_conv = "auto"     # auto | subpixel | resize (auto: subpixel on CPU and GPU)
  # LDM's layouts (models/unet.py); these defaults are DDPM's
  model.context_dim = 0            # > 0: class labels enter through cross-attention (LDM's
  #                                  SpatialTransformer, a [B, 1, context_dim] label context)
  model.transformer_depth = 1      # transformer blocks per SpatialTransformer
  model.attn_levels = ()           # levels (0: full size) with attention, not attn_resolutions
  model.num_heads = 1              # attention heads ...
  model.head_channels = 0          # ... or, when > 0, channels per head (LDM: 32)
  model.norm_eps = 1e-6            # GroupNorm epsilon (LDM / Stable Diffusion: 1e-5)
  model.flip_sin_to_cos = False    # timestep embedding [cos, sin] (LDM: True)
  model.freq_shift = 1.0           # its frequencies 1e4^(-i / (ch/2 - shift)) (LDM: 0)
  model.downsample_padding = "same"  # same (TF: after) | symmetric (torch padding=1, LDM)
  # DiT's (model.name = "dit"; with num_heads, norm_eps, freq_shift above; DiT-XL/2's values)
  model.patch_size = 2             # p x p patches of the (latent) image are its tokens
  model.hidden_size = 1152         # token width (DiT-L 1024, -B 768, -S 384)
  model.depth = 28                 # DiT blocks (DiT-L 24, -B 12, -S 12)
  model.mlp_ratio = 4.0            # the blocks' MLP width / hidden_size

  # what --mode=train trains: "diffusion" (model + diffusion), or "autoencoder": latent
  # diffusion's first stage (Rombach et al. 2022, Sec. 3.1), c.autoencoder below; the model.*
  # compute options (dtype, attention, remat, conv, upsample_conv) apply to it too
  c.stage = "diffusion"

  c.autoencoder = ae = ml_collections.ConfigDict()  # the KL autoencoder, models/autoencoder.py
  ae.ch = 128                      # kl-f8 (Stable Diffusion's VAE) layout
  ae.ch_mult = (1, 2, 4, 4)        # downsampling factor f = 2^(len - 1)
  ae.num_res_blocks = 2
  ae.attn_levels = ()              # levels (0: full size) with attention; the middle has it
  ae.z_channels = 4                # latent channels
  ae.codebook_size = 0             # > 0: a VQ first stage (LDM's vq-f4: 8192) instead of KL
  ae.dropout = 0.0
  ae.lr = 4.5e-4                   # Adam(0.5, 0.9) for both networks (LDM: 4.5e-6 x batch 96)
  ae.disc_ndf = 64                 # PatchGAN width and strided layers (70x70 patches with 3)
  ae.disc_layers = 3
  ae.lpips_path = placeholder(str)  # None: $DIFFUSION_JAX_LPIPS or ~/.cache/diffusion_jax
  ae.loss = loss = ml_collections.ConfigDict()  # train_autoencoder.LossConfig
  loss.kl_weight = 1e-6
  loss.perceptual_weight = 1.0     # LPIPS added per pixel to |x - x^|; 0: L1 alone
  loss.logvar = 0.0
  loss.disc_start = 50_001         # step of the first GAN update
  loss.disc_factor = 1.0
  loss.disc_weight = 0.5           # times the adaptive weight ||grad nll|| / ||grad g||
  loss.disc_loss = "hinge"         # hinge | vanilla
  loss.codebook_weight = 1.0       # VQ: codebook + commitment term's weight ...
  loss.commitment = 0.25           # ... and the commitment's beta inside it

  # latent diffusion (latent.py): the model diffuses a frozen autoencoder's latents
  c.latent = lt = ml_collections.ConfigDict()
  lt.autoencoder = placeholder(str)  # None: pixels; an autoencoder run's workdir (its layout:
  #   c.autoencoder), or public weights: a diffusers directory or one .safetensors file
  lt.scale_factor = placeholder(float)  # None: published with the weights, else 1/std(z)

  # text conditioning (text_conditioning.py): captions -> a frozen CLIP text encoder -> the
  # context the U-Net cross-attends to (model.context_dim = the encoder's width)
  c.text = text = ml_collections.ConfigDict()
  text.encoder = placeholder(str)  # None: none; "learned": LDM's transformer trained with the
  #   U-Net on the captions' bytes; or a frozen CLIP: a local SD pipeline dir (text_encoder/,
  #   tokenizer/) or a CLIPTextModel dir with its tokenizer files
  text.layers = 4                  # "learned": its transformer blocks (width model.context_dim)
  text.max_length = 77             # "learned": tokens per caption (bytes + begin/end)
  text.caption_template = placeholder(str)  # labelled data: captions, e.g. "a photo of a {}"
  text.dropout = 0.1               # training: the empty caption instead (classifier-free guidance)

  # DreamBooth (dreambooth.py): a text-to-image model fine-tuned on a few images of a subject
  c.dreambooth = db = ml_collections.ConfigDict()
  db.instance_prompt = placeholder(str)  # None: off; every training image's caption, with a
  #                                  rare identifier: "a photo of sks dog"
  db.class_prompt = placeholder(str)  # prior preservation, e.g. "a photo of dog"; None: off
  db.class_data_dir = placeholder(str)  # its class images; the missing ones generated there
  db.num_class_images = 200
  db.prior_loss_weight = 1.0       # lambda of Eq. 2

  c.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.beta_schedule = "linear"  # linear | cosine | quadratic | scaled_linear
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.mean_type = "eps"      # eps | x0 | mean (Table 2)
  diffusion.var_type = "fixedlarge"  # fixedlarge | fixedsmall | learned | learned_range
  diffusion.loss_type = "mse"      # mse (L_simple) | kl (the true bound) | hybrid
  diffusion.hybrid_lambda = 0.001

  c.training = training = ml_collections.ConfigDict()
  training.batch_size = 128        # global, over all devices and hosts
  training.num_steps = 800_000
  training.lr = 2e-4
  training.warmup_steps = 5000
  training.grad_clip = 1.0
  training.ema_decay = 0.9999
  training.grad_accum_steps = 1    # micro-batches per step (same result, less memory)
  training.steps_per_dispatch = 1  # optimiser steps per compiled call (lax.scan; same result)
  training.fsdp = False            # shard parameters and optimiser state over the data axis
  training.checkpoint_every = 10_000
  training.keep_checkpoints = 3
  training.log_every = 100
  training.sample_every = 20_000
  training.num_train_samples = 64  # images in the grid written every sample_every steps
  training.seed = 0

  c.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = "ancestral"    # ancestral | ddim | dpm_solver
  sampling.num_steps = 1000        # network evaluations (ancestral: < T respaces the chain)
  sampling.eta = 0.0               # DDIM eta
  sampling.spacing = placeholder(str)  # DDIM: uniform | quadratic; respaced ancestral: uniform
  #                                  | linspace | trailing; DPM-Solver: logsnr | uniform
  #                                  | leading | linspace | trailing (diffusers' spacings) | karras
  sampling.steps_offset = 0        # DDIM, DPM-Solver "leading": timesteps shifted by this
  #                                  (diffusers' steps_offset)
  sampling.alpha_one_at_end = True  # DDIM: the last step to alphabar = 1 (set_alpha_to_one)
  sampling.clip_denoised = True
  sampling.num_samples = 64
  sampling.batch_size = 256        # global; split over the devices
  sampling.checkpoint_step = placeholder(int)  # None: newest
  sampling.seed = 0
  sampling.progressive_steps = (999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 0)
  sampling.interp_t = 500          # timestep of the interpolation in noised space (Fig. 8)
  sampling.interp_lambdas = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
  sampling.figures = True          # also write the progressive and interpolation PNGs
  sampling.class_label = -1        # class-conditional: this class, or -1: all classes in turn
  sampling.guidance_scale = 1.0    # classifier-free guidance s (1: none; needs label_dropout
  #                                  or text.dropout in training)
  sampling.prompts = ()            # text-conditional: prompts in turn (empty: the class captions)

  c.eval = ev = ml_collections.ConfigDict()
  ev.metrics = "fid,is"           # comma-separated: fid, is, nll
  ev.num_examples = 50_000
  ev.batch_size = 256
  ev.split = "test"
  ev.clip_denoised = True           # NLL: x^_0 clipped to [-1, 1], as the reference code evaluates
  ev.samples_npz = placeholder(str)  # score this uint8 NHWC npz (key arr_0) instead of sampling
  ev.inception_path = placeholder(str)  # None: $DIFFUSION_JAX_INCEPTION or ~/.cache/diffusion_jax
  ev.ref_stats = placeholder(str)   # npz with mu, sigma; None: computed once, cached in eval/
  ev.ref_split = "train"            # FID reference set (the paper: the 50k training images)
  ev.ref_num_examples = 50_000
  ev.is_splits = 10                 # Inception Score: mean and std over 10 splits
  return c
