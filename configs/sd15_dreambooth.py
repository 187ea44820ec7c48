"""DreamBooth on Stable Diffusion 1.x (Ruiz et al. 2023; diffusion_jax/dreambooth.py): its U-Net
fine-tuned on 3-5 photos of one subject, each captioned "a photo of sks dog" ("sks": a rare
token, the subject's new name), with the prior preservation loss on 200 images of "a photo of
dog" that the model generates itself before the first step. The CLIP text encoder and the VAE
stay frozen. What diffusers' train_dreambooth example does, in JAX.

  SD=/path/to/stable-diffusion-v1-5      # a local diffusers pipeline directory
  python -m diffusion_jax.convert --src=$SD --config=configs/sd15_dreambooth.py \
      --workdir=runs/sks_dog --config.text.encoder=$SD --config.latent.autoencoder=$SD/vae
  python main.py --config=configs/sd15_dreambooth.py --workdir=runs/sks_dog \
      --config.text.encoder=$SD --config.latent.autoencoder=$SD/vae \
      --config.data.data_dir=/path/to/dog_photos --config.dreambooth.class_data_dir=runs/dog
  python main.py ... --mode=sample --config.sampling.prompts="('a photo of sks dog in a bucket',)"
  python -m diffusion_jax.export --config=configs/sd15_dreambooth.py --workdir=runs/sks_dog \
      --config.text.encoder=$SD --config.latent.autoencoder=$SD/vae --out=exported/sks_dog

The class images (dreambooth.class_data_dir) are generated at step 0 from the imported weights
with the sampler below (50 DDIM steps, guidance 7.5), and reused by later runs; images already
there (e.g. real photos of dogs) count. Recipe: diffusers' example with prior preservation (Adam
at 5e-6, constant, 800 steps, one instance and one class image per step, prior_loss_weight 1,
200 class images, 512 px) and no EMA (the fine-tuned weights themselves are sampled and
exported). On a GPU set --config.model.dtype=bfloat16 and --config.model.remat=True.
"""
from configs.sd15_finetune import get_config as finetune


def get_config():
  c = finetune()
  db = c.dreambooth
  db.instance_prompt = "a photo of sks dog"
  db.class_prompt = "a photo of dog"
  db.class_data_dir = None         # required: where the class images are (or are generated)
  db.num_class_images = 200
  db.prior_loss_weight = 1.0

  c.data.random_flip = False
  c.text.dropout = 0.0             # every image keeps its prompt
  c.training.batch_size = 2        # one instance image + one class image
  c.training.num_steps = 800
  c.training.lr = 5e-6
  c.training.ema_decay = 0.0       # the weights themselves: no EMA over 800 steps
  c.training.checkpoint_every = 200
  c.training.sample_every = 200
  c.training.num_train_samples = 4
  c.sampling.prompts = ("a photo of sks dog",)
  c.sampling.batch_size = 4
  return c
