"""A dataset that is not there, only half prepared, or damaged, stops the run
at once with what to do about it."""

import os
import subprocess
import sys
import time

import pytest

from alexnet_jax import imagenet, loader_benchmark, store, train
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


def _tiny_store(directory):
  return loader_benchmark.write_fake_store(str(directory), 8, 4, size=32,
                                           num_classes=2, shards=2)


def test_a_damaged_shard_is_named_before_any_record_is_read(tmp_path):
  info = _tiny_store(tmp_path)
  shard = tmp_path / info.shards['train'][1]
  shard.write_bytes(b'\0' * shard.stat().st_size)
  # ArrayRecord's reader does not raise on such a file; the loader would
  # have read its records as undecodable ones and skipped them all.
  with pytest.raises(store.StoreError, match=f'Cannot read the shard .*'
                     f'{shard.name}.*missing or damaged.*ulimit -n'):
    imagenet.PreparedDataset(str(tmp_path), 24)


def test_shards_that_disagree_with_info_json_are_refused(tmp_path):
  info = _tiny_store(tmp_path)
  source = store.SplitSource(str(tmp_path), 'train')
  records = [store.encode_record(*source[i]) for i in range(len(source))]
  del source
  store.write_shard(os.path.join(str(tmp_path), info.shards['train'][0]),
                    records[:2])
  with pytest.raises(store.StoreError, match="'train' shards .* hold 6 "
                     'records, and info.json says 8'):
    store.SplitSource(str(tmp_path), 'train')


def test_the_open_files_limit_is_raised_to_hold_the_shards(tmp_path):
  _tiny_store(tmp_path)
  # In a process of its own: a soft limit on open files below what the
  # shards' readers need is raised (an ImageNet store has about 1,300).
  script = f'''
import os, resource
from alexnet_jax import store
in_use = len(os.listdir('/proc/self/fd'))
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 1, hard))
source = store.SplitSource({str(tmp_path)!r}, 'train')
assert len(source) == 8 and source[7][0] == 1
print('soft limit', resource.getrlimit(resource.RLIMIT_NOFILE)[0] - in_use)
'''
  out = subprocess.run([sys.executable, '-c', script], capture_output=True,
                       text=True, check=True, timeout=60).stdout
  assert int(out.split('soft limit')[1]) >= 2 + 64   # the shards and room
