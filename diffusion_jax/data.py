"""Data: Fashion-MNIST (IDX files), CIFAR-10 / CelebA-HQ / LSUN (tfds data_source), image folders.

Every source is random access; batches come through grain with reader threads and
prefetching. The order is a pure function of (seed, step): epoch e is a permutation drawn from
(seed, e); global step s takes the positions [s*B, (s+1)*B) of the endless stream of epochs and
process p its slice [p*B/P, (p+1)*B/P) of them. A run resumed at step s therefore sees exactly
the batches the uninterrupted run would have, on any number of hosts.
"""
from __future__ import annotations

import functools
import glob
import gzip
import json
import os
import re

import grain
import numpy as np
from PIL import Image

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
TFDS_NAMES = {"cifar10": "cifar10", "celeb_a_hq": "celeb_a_hq/256",
              "lsun_church": "lsun/church_outdoor", "imagenet2012": "imagenet2012"}
TFDS_SPLITS = {"cifar10": {"train": "train", "test": "test"},
               "celeb_a_hq": {"train": "train", "test": "train"},  # CelebA-HQ has one split
               "lsun_church": {"train": "train", "test": "validation"},
               "imagenet2012": {"train": "train", "test": "validation"}}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# class names, for captions of labelled data (text.caption_template)
CLASS_NAMES = {"fashion_mnist": ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal",
                                 "shirt", "sneaker", "bag", "ankle boot"),
               "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                           "horse", "ship", "truck")}


class DataError(RuntimeError):
  pass


# ----------------------------------------------------------------------------- sources
def read_idx(path: str) -> np.ndarray:
  """An IDX file (optionally gzip) as a uint8 array, its header checked."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read {path}: {e}; the file is damaged, fetch it again") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
  ndim = raw[3]
  dims = tuple(int(v) for v in np.frombuffer(raw, ">u4", ndim, 4))
  body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise DataError(f"{path} is truncated: header says {dims}, found {body.size} bytes of data")
  return body.reshape(dims)


class ArraySource:
  """Random access over in-memory images [N, H, W, C] and labels [N]."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": int(self.labels[i])}


def _fit(image: np.ndarray, size: int, channels: int) -> np.ndarray:
  """Center-crop to a square and resize (bicubic) to size x size, with `channels` channels."""
  img = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
  img = img.convert("L" if channels == 1 else "RGB")
  w, h = img.size
  if (w, h) != (size, size):
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
      img = img.resize((size, size), Image.BICUBIC)
  out = np.asarray(img, np.uint8)
  return out[..., None] if out.ndim == 2 else out


class MappedSource:
  """A source whose images are fitted to the configured size on access."""

  def __init__(self, source, size: int, channels: int):
    self.source, self.size, self.channels = source, size, channels
    self.classes = getattr(source, "classes", None)  # a folder's class names, if any

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    ex = self.source[int(i)]
    return {"image": _fit(np.asarray(ex["image"]), self.size, self.channels),
            "label": int(ex.get("label", 0))}

  @property
  def captions(self):
    return getattr(self.source, "captions", None)


class FolderSource:
  """Image files; labelled by class folder (ImageFolder's layout: root/<class>/...) when every
  image lies in a subfolder, the classes numbered in sorted order; else all label 0. Captions
  (text conditioning; read when asked for, so that other uses ignore them): root/metadata.jsonl
  lines {"file_name": path relative to root, "text": caption} (Hugging Face's imagefolder
  layout; "caption" also read), or a text file beside each image (cat.png -> cat.txt)."""

  def __init__(self, root: str, paths):
    self.root, self.paths = root, paths
    tops = [os.path.relpath(p, root).split(os.sep) for p in paths]
    self.classes = (sorted({t[0] for t in tops}) if all(len(t) > 1 for t in tops) else None)
    index = {c: i for i, c in enumerate(self.classes or ())}
    self.labels = [index[t[0]] if self.classes else 0 for t in tops]

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with Image.open(self.paths[i]) as img:
      return {"image": np.asarray(img.convert("RGB")), "label": self.labels[i]}

  @functools.cached_property
  def captions(self) -> list[str] | None:
    """Image i's caption at [i]; None when the folder has none."""
    return _folder_captions(self.root, self.paths)


def _folder_captions(root: str, paths) -> list[str] | None:
  """Each image's caption from root/metadata.jsonl or its .txt file; None when there are none;
  an error when only some images have one."""
  found = {}
  meta = os.path.join(root, "metadata.jsonl")
  if os.path.exists(meta):
    with open(meta, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
          found[os.path.normpath(os.path.join(root, rec["file_name"]))] = str(
              rec["text"] if "text" in rec else rec["caption"])
        except (ValueError, KeyError, TypeError) as e:
          raise DataError(f"{meta} line {n}: expected {{\"file_name\": ..., \"text\": ...}} "
                          f"({type(e).__name__}: {e})") from e
  for p in paths:
    txt = os.path.splitext(p)[0] + ".txt"
    if os.path.normpath(p) not in found and os.path.exists(txt):
      with open(txt, encoding="utf-8") as f:
        found[os.path.normpath(p)] = f.read().strip()
  if not found:
    return None
  missing = [p for p in paths if os.path.normpath(p) not in found]
  if missing:
    raise DataError(f"{len(missing)} of {len(paths)} images under {root} have no caption (e.g. "
                    f"{missing[0]}): give each one a line in metadata.jsonl or a .txt file")
  return [found[os.path.normpath(p)] for p in paths]


def _fashion_mnist(data_cfg, split):
  directory = data_cfg.data_dir or FASHION_MNIST_DIR
  files = [os.path.join(directory, f) for f in FASHION_FILES[split]]
  missing = [f for f in files if not os.path.exists(f)]
  if missing:
    raise DataError(
        f"Fashion-MNIST not found: missing {', '.join(missing)}. Get it with "
        "`apt-get install dataset-fashion-mnist` (as root), or `bash scripts/get_fashion_mnist.sh "
        "DIR` (downloads the four official files) and pass --config.data.data_dir=DIR")
  images, labels = read_idx(files[0]), read_idx(files[1])
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise DataError(f"{files[0]} and {files[1]} do not hold matching images and labels")
  size = data_cfg.image_size
  if size == 32:  # the quickstart: zero-pad 28 -> 32 (2 pixels each side), no resampling
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
  elif size != 28:
    images = np.stack([_fit(im, size, 1)[..., 0] for im in images])
  return ArraySource(images[..., None], labels)


def _tfds(data_cfg, split):
  import tensorflow_datasets as tfds
  name = TFDS_NAMES[data_cfg.name]
  tfds_split = TFDS_SPLITS[data_cfg.name].get(split, split)
  try:
    source = tfds.data_source(name, split=tfds_split, data_dir=data_cfg.data_dir)
  except Exception as e:  # noqa: BLE001 -- tfds raises many kinds for a missing dataset
    raise DataError(
        f"tensorflow-datasets '{name}' (split {tfds_split}) is not prepared"
        f"{' in ' + data_cfg.data_dir if data_cfg.data_dir else ''}: {type(e).__name__}: {e}. "
        "On a machine with internet (preparation needs tensorflow) run: python -c \"import "
        f"tensorflow_datasets as tfds; tfds.builder('{name}').download_and_prepare("
        "file_format='array_record')\" and pass --config.data.data_dir=<its data_dir>"
        + (" (imagenet2012 needs its tar files in tfds' manual_dir first: they are not "
           "downloadable)" if data_cfg.name == "imagenet2012" else "")) from e
  return MappedSource(source, data_cfg.image_size, data_cfg.channels)


def _folder(data_cfg, split):
  del split
  root = data_cfg.data_dir
  paths = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                 if p.lower().endswith(IMAGE_EXTS))
  if not paths:
    raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) under data.data_dir={root!r}: put "
                    "your images there (any size; they are center-cropped and resized)")
  return MappedSource(FolderSource(root, paths), data_cfg.image_size, data_cfg.channels)


def load_source(data_cfg, split: str = "train"):
  """Random-access source of {"image": uint8 HWC at the configured size, "label": int}."""
  if split not in ("train", "test"):
    raise DataError(f"split {split!r}: use 'train' or 'test'")
  loaders = {"fashion_mnist": _fashion_mnist, "folder": _folder}
  source = loaders.get(data_cfg.name, _tfds)(data_cfg, split)
  if len(source) == 0:
    raise DataError(f"{data_cfg.name} {split} is empty")
  shape = np.asarray(source[0]["image"]).shape
  want = (data_cfg.image_size, data_cfg.image_size, data_cfg.channels)
  if shape != want:
    raise DataError(f"{data_cfg.name} images are {shape}, but config.data.image_size / channels "
                    f"ask for {want}: set --config.data.channels={shape[-1]}")
  return source


def class_names(data_cfg, source=None) -> tuple[str, ...] | None:
  """The names of the labels: Fashion-MNIST's and CIFAR-10's, an image folder's class
  subfolders, a tfds dataset's label names (`source`, else the training split's); None if
  unknown, or not words (imagenet2012's are WordNet ids, n01440764, ...)."""
  if data_cfg.name in CLASS_NAMES:
    return CLASS_NAMES[data_cfg.name]
  if source is None:
    source = load_source(data_cfg, "train")
  names = getattr(source, "classes", None)
  if names is None and source is not None:
    try:  # tfds: the ClassLabel feature's names
      names = source.source.dataset_info.features["label"].names
    except (AttributeError, KeyError, TypeError):
      names = None
  if not names or all(re.fullmatch(r"n\d{8}", str(n)) for n in names):
    return None
  return tuple(str(n) for n in names)


def caption_fn(config, source):
  """(index, example) -> its caption (text conditioning): the source's own captions, else
  text.caption_template with the class names; one message when there are neither."""
  from diffusion_jax.text_conditioning import class_captions
  own = getattr(source, "captions", None)
  if own is not None:
    return lambda index, ex: own[index]
  template, names = config.text.get("caption_template"), class_names(config.data, source)
  if template and names:
    captions = class_captions(template, names)
    return lambda index, ex: captions[int(ex["label"])]
  raise DataError(
      f"text.encoder needs a caption per image: {config.data.name} has no captions of its own"
      + ("" if names else " and no class names")
      + (". Set --config.text.caption_template='a photo of a {}' (labelled data)" if names else
         ". Put root/metadata.jsonl ({\"file_name\": ..., \"text\": ...} per line) or a .txt "
         "beside each image (data.name='folder')"))


# ----------------------------------------------------------------------------- order
@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def example_at(position: int, n: int, seed: int) -> tuple[int, bool]:
  """(dataset index, horizontal flip) of a global stream position: a function of (seed, pos)."""
  epoch, offset = divmod(int(position), n)
  flip = bool(np.random.default_rng([seed, int(position), 1]).integers(2))
  return int(_permutation(n, seed, epoch)[offset]), flip


def to_float(image: np.ndarray, flip: bool = False) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (data scaling of the paper), optionally mirrored."""
  x = image.astype(np.float32) / 127.5 - 1.0
  return x[:, ::-1] if flip else x


def train_batches(config, start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None, tokenize=None):
  """Endless iterator of this process's share of each global batch, from `start_step` on;
  with `tokenize` (captions -> int32 ids [n, L]), each example's caption's ids as "tokens"."""
  import jax
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  batch, seed = config.training.batch_size, config.training.seed
  if batch % count:
    raise DataError(f"training.batch_size={batch} does not split over {count} processes")
  local = batch // count
  source = load_source(config.data, "train")
  n, flip_ok = len(source), config.data.random_flip
  classes, k = getattr(source, "classes", None), config.get("model", {}).get("num_classes", 0)
  if classes and k and len(classes) > k:
    raise DataError(f"{config.data.data_dir} has {len(classes)} class folders; the model "
                    f"embeds {k}: set --config.model.num_classes={len(classes)}")
  if k and config.data.name == "folder" and not classes:
    raise DataError(f"model.num_classes={k} needs labels: put the images of each class in a "
                    f"subfolder of {config.data.data_dir} (DIR/<class>/...), or set "
                    "--config.model.num_classes=0")

  from diffusion_jax import dreambooth
  if dreambooth.enabled(config):
    load = _dreambooth_loader(config, source, local, p, count, tokenize)
  else:
    caption = caption_fn(config, source) if tokenize else None

    def load(k):  # k counts this process's examples from step 0 on
      step, j = divmod(int(k), local)
      index, flip = example_at(step * batch + p * local + j, n, seed)
      ex = source[index]
      out = {"image": to_float(np.asarray(ex["image"]), flip and flip_ok),
             "label": np.int32(ex["label"])}
      if caption is not None:
        out["tokens"] = tokenize([caption(index, ex)])[0]
      return out

  ds = grain.MapDataset.range(start_step * local, 1 << 50).map(load).batch(local)
  opts = grain.ReadOptions(num_threads=max(1, config.data.num_threads), prefetch_buffer_size=2 * local)
  return iter(ds.to_iter_dataset(opts))


def _dreambooth_loader(config, source, local: int, p: int, count: int, tokenize):
  """load(k) of DreamBooth's batches (dreambooth.py): each process's share of a batch is its
  instance images (captioned dreambooth.instance_prompt), then, with prior preservation, as
  many class images (dreambooth.class_prompt, from dreambooth.class_data_dir) with their loss
  weights; each half an endless stream in the order of (seed, position) as above."""
  from diffusion_jax import dreambooth
  if tokenize is None:
    raise DataError("dreambooth.instance_prompt needs a text-conditional model (text.encoder)")
  db, seed, flip_ok = config.dreambooth, config.training.seed, config.data.random_flip
  halves = [(source, db.instance_prompt, None)]
  if dreambooth.prior_preservation(config):
    weights = dreambooth.loss_weights(config)
    if local % 2:
      raise DataError(f"prior preservation: each process's batch ({local}) must split into "
                      "instance and class halves: make training.batch_size even per process")
    paths = dreambooth.class_images(db.class_data_dir)[:int(db.num_class_images)]
    if not paths:
      raise DataError(f"no class images in dreambooth.class_data_dir={db.class_data_dir}")
    classes = MappedSource(FolderSource(db.class_data_dir, paths), config.data.image_size,
                           config.data.channels)  # the first num_class_images, as counted
    halves = [(source, db.instance_prompt, weights[0]), (classes, db.class_prompt, weights[1])]
  per = local // len(halves)  # this process's examples of each half
  ids = [tokenize([prompt])[0] for _, prompt, _ in halves]

  def load(k):
    step, j = divmod(int(k), local)
    h, jj = divmod(j, per)
    src, _, weight = halves[h]
    index, flip = example_at(step * per * count + p * per + jj, len(src), seed + h)
    out = {"image": to_float(np.asarray(src[index]["image"]), flip and flip_ok),
           "label": np.int32(0), "tokens": ids[h]}
    if weight is not None:
      out["loss_weight"] = np.float32(weight)
    return out
  return load


def eval_images(config, split: str, num_examples: int, batch_size: int):
  """float32 [-1, 1] batches of the first `num_examples` images of `split`, in order."""
  source = load_source(config.data, split)
  n = min(num_examples, len(source))
  for start in range(0, n, batch_size):
    idx = range(start, min(start + batch_size, n))
    yield np.stack([to_float(np.asarray(source[i]["image"])) for i in idx])
