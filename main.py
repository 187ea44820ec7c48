"""diffusion_jax entry point.

  python main.py --config=configs/cifar10_ddpm.py --workdir=runs/cifar10 [--mode=train]
  python main.py --config=configs/cifar10_ddpm.py --workdir=runs/cifar10 --mode=sample \
      --config.sampling.method=ddim --config.sampling.num_steps=50
  python main.py --config=configs/cifar10_ddpm.py --workdir=runs/cifar10 --mode=eval \
      --config.eval.metrics=fid,is,nll
  python main.py --config=configs/cifar10_ddpm.py --mode=summary

Modes: train (resumes from the newest checkpoint in --workdir), sample, eval, summary.
A config with stage="autoencoder" (configs/fashion_mnist_kl.py) trains, evaluates and summarises
latent diffusion's first stage instead.
"""
import logging as py_logging
import sys

from diffusion_jax import huge_pages

huge_pages.reexec_if_useful()  # first: XLA:CPU's buffers on huge pages (~12 % faster on CPU)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax.validate import MODES, ConfigError, validate_config  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples are written.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.mark_flags_as_required(["config"])


class _QuietLibraries(py_logging.Filter):
  """Orbax logs every save and restore at INFO (a screenful each): keep its warnings only."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  if FLAGS.mode != "summary":
    if not FLAGS.workdir:
      sys.exit(f"--workdir is required for --mode={FLAGS.mode}")
    from diffusion_jax import parallel
    parallel.maybe_initialize_distributed()  # before any JAX call, so devices are global
  try:
    validate_config(config, FLAGS.mode)
  except ConfigError as e:
    sys.exit(f"Config error: {e}")
  if FLAGS.mode == "summary":
    from diffusion_jax.summary import summary_text
    print(summary_text(config))
    return
  from diffusion_jax.checkpoints import CheckpointError
  from diffusion_jax.convert_inception import InceptionWeightsError
  from diffusion_jax.data import DataError
  from diffusion_jax.lpips import LPIPSWeightsError
  from diffusion_jax.train import TrainingError
  try:
    if FLAGS.mode == "train":
      from diffusion_jax.train import train_and_evaluate
      train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      from diffusion_jax.sample import run_sample_mode
      logging.info("Samples in %s", run_sample_mode(config, FLAGS.workdir))
    elif FLAGS.mode == "eval":
      from diffusion_jax.evaluate import run_eval_mode
      logging.info("Results: %s", run_eval_mode(config, FLAGS.workdir))
  except (ConfigError, DataError, CheckpointError, TrainingError,
          InceptionWeightsError, LPIPSWeightsError) as e:
    logging.error("%s", e)
    sys.exit(f"{type(e).__name__}: {e}")


def parse_flags(argv):
  """absl's parser, with a mistyped or ill-typed --config.* override as one clear line."""
  try:
    return FLAGS(argv)
  except (KeyError, AttributeError, TypeError, ValueError, flags.Error) as e:
    msg = " ".join(str(e).replace("\\'", "").replace("\\n", "\n").split()).strip("'\"")
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"Config error: {msg}\n(overrides given: {' '.join(bad) or 'none'}; "
             "keys and defaults: configs/base.py)")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
