"""Test session setup: 8 simulated CPU devices and a persistent compilation cache (DESIGN contract 12).

XLA_FLAGS must be set before JAX initialises its backends, hence at import time of this file.
"""

import os
import pathlib
import sys

# torch's optional triton (GPU kernels, unused on the CPU) loads an LLVM that crashes this process in some
# import orders once jaxlib is loaded (a segfault while collecting tests). Blocking it makes torch and
# torchvision treat triton as absent.
sys.modules.setdefault('triton', None)

_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after XLA_FLAGS)

_CACHE = pathlib.Path(os.environ.get('UDI_TEST_JAX_CACHE',
                                     pathlib.Path(__file__).resolve().parents[1] / '.jax_cache'))
jax.config.update('jax_compilation_cache_dir', str(_CACHE))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """The shared tiny training run (DESIGN contract 12): `tests/tiny_train_config.py` trained in this process
  on the 8 simulated devices for 2 epochs of 4 steps, with k-NN after each epoch and the end-of-training
  report (k-NN table, pictures). Returns (config, workdir)."""
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from tests import tiny_train_config
  from udi_jax.train.loop import train_and_evaluate
  config = tiny_train_config.get_config()
  config.epochs = 2
  config.eval.knn_every_epochs = 1        # k-NN during training, logged
  config.eval.tokens = ('cls', 'cls_plus', 'concat')
  config.eval.report = True               # the demo's table and pictures at the end
  workdir = tmp_path_factory.mktemp('tiny_run')
  train_and_evaluate(config, str(workdir))
  return config, workdir
