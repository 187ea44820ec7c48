"""Data: real Fashion-MNIST, IDX parsing, the (seed, step) order, process shares, folders."""
import gzip
import os
import struct

import ml_collections
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import data
from helpers import write_idx

REAL = "/usr/share/datasets/fashion-mnist"


def cfg(data_dir, name="fashion_mnist", size=32, channels=1, batch=8, seed=0, flip=True):
  return ml_collections.ConfigDict({
      "data": {"name": name, "data_dir": data_dir, "image_size": size, "channels": channels,
               "random_flip": flip, "num_threads": 2},
      "training": {"seed": seed, "batch_size": batch}})


@pytest.mark.skipif(not os.path.exists(os.path.join(REAL, "t10k-images-idx3-ubyte.gz")),
                    reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
  c = cfg(None)
  train, test = data.load_source(c.data, "train"), data.load_source(c.data, "test")
  assert len(train) == 60000 and len(test) == 10000
  ex = test[0]
  assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.uint8
  assert ex["image"][:2].max() == 0 and ex["image"][:, :2].max() == 0  # zero padding 28 -> 32
  assert ex["label"] == 9  # the first test image is an ankle boot
  b = next(data.eval_images(c, "test", 16, 16))
  assert b.shape == (16, 32, 32, 1) and b.min() >= -1 and b.max() <= 1


def test_idx_parsing_and_damage(tmp_path):
  d = write_idx(str(tmp_path), n_train=10, n_test=4)
  imgs = data.read_idx(os.path.join(d, "train-images-idx3-ubyte.gz"))
  assert imgs.shape == (10, 28, 28) and imgs.dtype == np.uint8
  bad = tmp_path / "bad.gz"
  with gzip.open(bad, "wb") as f:
    f.write(struct.pack(">IIII", 2051, 10, 28, 28) + b"\0" * 100)
  with pytest.raises(data.DataError, match="truncated"):
    data.read_idx(str(bad))
  with gzip.open(bad, "wb") as f:
    f.write(b"not an idx file")
  with pytest.raises(data.DataError, match="magic"):
    data.read_idx(str(bad))


def take(it, n):
  return [next(it) for _ in range(n)]


def test_order_is_a_function_of_seed_and_step(tmp_path):
  c = cfg(write_idx(str(tmp_path), n_train=20, n_test=4), batch=8)  # 20 % 8 != 0: epochs roll
  full = take(data.train_batches(c, 0, 0, 1), 8)
  resumed = take(data.train_batches(c, 5, 0, 1), 3)
  for a, b in zip(full[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  again = take(data.train_batches(c, 0, 0, 1), 2)
  np.testing.assert_array_equal(again[1]["image"], full[1]["image"])
  other = take(data.train_batches(cfg(c.data.data_dir, seed=1), 0, 0, 1), 1)
  assert not np.array_equal(other[0]["image"], full[0]["image"])
  # every example once per epoch: positions 0..19 cover the 20 images
  src = data.load_source(c.data, "train")
  idx = [data.example_at(p, 20, 0)[0] for p in range(20)]
  assert sorted(idx) == list(range(20))
  flips = [data.example_at(p, 20, 0)[1] for p in range(200)]
  assert 60 < sum(flips) < 140
  assert len(src) == 20
  for b in full:
    assert b["image"].shape == (8, 32, 32, 1) and b["image"].dtype == np.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1


def test_process_shares_concatenate_to_the_global_batch(tmp_path):
  c = cfg(write_idx(str(tmp_path), n_train=30, n_test=4), batch=8)
  one = take(data.train_batches(c, 2, 0, 1), 2)
  parts = [take(data.train_batches(c, 2, p, 2), 2) for p in range(2)]
  for s in range(2):
    np.testing.assert_array_equal(
        np.concatenate([parts[0][s]["image"], parts[1][s]["image"]]), one[s]["image"])
  with pytest.raises(data.DataError, match="does not split over 3 processes"):
    next(data.train_batches(c, 0, 0, 3))


def test_image_folder(tmp_path):
  rng = np.random.default_rng(0)
  for i, (w, h) in enumerate([(40, 30), (64, 64), (20, 50)]):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
  c = cfg(str(tmp_path), name="folder", size=16, channels=3)
  src = data.load_source(c.data, "train")
  assert len(src) == 3 and all(src[i]["image"].shape == (16, 16, 3) for i in range(3))
  assert {src[i]["label"] for i in range(3)} == {0}  # no class folders: unlabelled
  with pytest.raises(data.DataError, match="no images"):
    data.load_source(cfg(str(tmp_path / "empty"), name="folder").data, "train")


def test_image_folder_classes_are_its_subfolders(tmp_path):
  for i, name in enumerate(["dog", "cat", "cat", "bird"]):
    (tmp_path / name).mkdir(exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
  c = cfg(str(tmp_path), name="folder", size=8, channels=3, batch=4)
  src = data.load_source(c.data, "train")
  assert src.classes == ["bird", "cat", "dog"]  # sorted: bird 0, cat 1, dog 2
  assert sorted(src[i]["label"] for i in range(4)) == [0, 1, 1, 2]
  c.model = {"num_classes": 2}
  with pytest.raises(data.DataError, match="3 class folders.*num_classes=3"):
    next(data.train_batches(c, 0, 0, 1))
  c.model = {"num_classes": 3}
  assert next(data.train_batches(c, 0, 0, 1))["label"].shape == (4,)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "stray.png")  # unlabelled
  with pytest.raises(data.DataError, match="needs labels: put the images of each class"):
    next(data.train_batches(c, 0, 0, 1))


def test_missing_data_says_how_to_get_it(tmp_path):
  with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
    data.load_source(cfg(str(tmp_path)).data, "train")
  with pytest.raises(data.DataError, match="channels"):
    data.load_source(cfg(write_idx(str(tmp_path / "f")), channels=3).data, "train")


def test_imagenet_mock_data_is_center_cropped_with_its_labels():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    c = cfg(None, name="imagenet2012", channels=3, batch=2)
    c.data.image_size = 32
    src = data.load_source(c.data, "test")  # the validation split
    assert len(src) == 6 and src[0]["image"].shape == (32, 32, 3)
    assert all(0 <= int(src[i]["label"]) < 1000 for i in range(6))


def test_cifar10_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    c = cfg(None, name="cifar10", channels=3, batch=4)
    src = data.load_source(c.data, "train")
    assert len(src) == 12 and src[0]["image"].shape == (32, 32, 3)
    b = next(data.train_batches(c, 0, 0, 1))
    assert b["image"].shape == (4, 32, 32, 3)
