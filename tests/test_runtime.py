"""Device selection: a config that needs more accelerators than the machine
has stops before compiling and says what to run instead."""

import dataclasses

import jax
import pytest

from alexnet_jax import train, validation
from configs import one_weird_trick, two_gpu


@dataclasses.dataclass
class FakeDevice:
  id: int
  platform: str = 'gpu'


def test_too_few_accelerators_says_what_to_run(monkeypatch):
  monkeypatch.setattr(jax, 'devices', lambda: [FakeDevice(0)])
  with pytest.raises(validation.ConfigError) as error:
    train.select_devices(two_gpu.get_config())
  message = str(error.value)
  assert 'config.num_devices=2' in message
  assert '1 gpu device' in message
  assert 'configs/one_gpu.py' in message


def test_all_local_devices_by_default(monkeypatch):
  devices = [FakeDevice(i) for i in range(8)]
  monkeypatch.setattr(jax, 'devices', lambda: devices)
  assert train.select_devices(one_weird_trick.get_config()) == devices


def test_single_device_scheme_takes_one(monkeypatch):
  devices = [FakeDevice(i) for i in range(4)]
  monkeypatch.setattr(jax, 'devices', lambda: devices)
  config = two_gpu.get_config()
  config.parallelism = 'none'
  assert train.select_devices(config) == devices[:1]
