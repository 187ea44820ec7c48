"""Fine-tune Stable Diffusion 1.x (its 860M U-Net; the CLIP text encoder and the VAE frozen) on
your captioned images: LDM's text-to-image model (Rombach et al. 2022, Sec. 3.3 and 4.3) in SD's
layout, what diffusers' train_text_to_image example does, in JAX.

  SD=/path/to/stable-diffusion-v1-5      # a local diffusers pipeline directory
  python -m diffusion_jax.convert --src=$SD --config=configs/sd15_finetune.py \
      --workdir=runs/sd15_ft --config.text.encoder=$SD --config.latent.autoencoder=$SD/vae
  python main.py --config=configs/sd15_finetune.py --workdir=runs/sd15_ft \
      --config.text.encoder=$SD --config.latent.autoencoder=$SD/vae \
      --config.data.data_dir=/path/to/images      # metadata.jsonl or a .txt per image
  python main.py ... --mode=sample --config.sampling.prompts="('a photo of ...',)"

The import writes the pipeline's U-Net as step 0 (parameters and EMA); training continues from
it. Data: image files of any size (center-cropped, resized to 512) with one caption each
(data.py). Recipe: diffusers' example (Adam at 1e-5, gradient clipping 1, EMA, random flips,
512 px), and SD's 10 % empty captions so that guidance keeps working. On a GPU set
--config.model.dtype=bfloat16 and --config.model.remat=True (memory); 50 DDIM steps with
guidance 7.5 as SD's pipelines sample.
"""
from configs.base import get_config as base


def get_config():
  c = base()
  c.data.name = "folder"
  c.data.image_size = 512
  c.data.channels = 3

  # Stable Diffusion 1.x's UNet2DConditionModel (convert_diffusers maps its weights)
  c.model.ch = 320
  c.model.ch_mult = (1, 2, 4, 4)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = ()
  c.model.attn_levels = (0, 1, 2)
  c.model.dropout = 0.0
  c.model.context_dim = 768        # CLIP ViT-L/14's text width (SD 2.x: 1024, head_channels 64)
  c.model.num_heads = 8
  c.model.transformer_depth = 1
  c.model.norm_eps = 1e-5
  c.model.flip_sin_to_cos = True
  c.model.freq_shift = 0.0
  c.model.downsample_padding = "symmetric"

  c.latent.autoencoder = None      # the pipeline's vae/ (KL-f8: 64x64x4 latents)
  c.latent.scale_factor = 0.18215
  c.text.encoder = None            # the pipeline directory (text_encoder/, tokenizer/)
  c.text.dropout = 0.1

  c.diffusion.beta_schedule = "scaled_linear"
  c.diffusion.beta_start = 0.00085
  c.diffusion.beta_end = 0.012
  c.diffusion.var_type = "fixedsmall"

  c.training.batch_size = 16
  c.training.num_steps = 15_000
  c.training.lr = 1e-5
  c.training.warmup_steps = 0
  c.training.ema_decay = 0.9999
  c.training.checkpoint_every = 1000
  c.training.log_every = 10
  c.training.sample_every = 1000
  c.training.num_train_samples = 8

  c.sampling.method = "ddim"
  c.sampling.num_steps = 50
  c.sampling.steps_offset = 1      # SD's scheduler: "leading" spacing, steps_offset 1,
  c.sampling.alpha_one_at_end = False  # set_alpha_to_one False, clip_sample False
  c.sampling.clip_denoised = False
  c.sampling.guidance_scale = 7.5
  c.sampling.batch_size = 8
  c.sampling.prompts = ("a photograph of an astronaut riding a horse",)
  c.sampling.figures = False
  c.eval.metrics = "fid"
  return c
