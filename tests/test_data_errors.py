"""A dataset that is not there, or only half prepared, stops the run at once
with what to do about it."""

import time

import pytest

from alexnet_jax import store, train
from configs import one_gpu


def _config(dataset, store_dir):
  config = one_gpu.get_config('synthetic')
  config.dataset = dataset
  config.store_dir = store_dir
  return config


def test_missing_imagenet_says_where_the_tars_go(tmp_path):
  start = time.perf_counter()
  with pytest.raises(FileNotFoundError) as error:
    train.train_and_evaluate(_config('imagenet2012', str(tmp_path / 'none')),
                             str(tmp_path / 'work'))
  message = str(error.value)
  for needed in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar',
                 'python -m alexnet_jax.prepare --dataset=imagenet2012',
                 '--config.store_dir='):
    assert needed in message
  # Before compiling or initialising anything.
  assert time.perf_counter() - start < 5


def test_half_prepared_store_says_to_finish_it(tmp_path):
  info = store.StoreInfo('folder', ['a', 'b'], complete=False)
  info.save(str(tmp_path))
  with pytest.raises(FileNotFoundError) as error:
    train.train_and_evaluate(_config('folder', str(tmp_path)),
                             str(tmp_path / 'work'))
  message = str(error.value)
  assert 'only partly prepared' in message
  assert '--dataset=folder --source=ROOT' in message
