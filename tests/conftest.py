"""Test session setup: 8 simulated CPU devices, fast compilation and a persistent compilation cache
(docs/design.md, contract 12).

The suite is bound by XLA compilation, so the tests compile with LLVM's backend optimisation off
(`--xla_backend_optimization_level=0`) and XLA's older element-wise emitter
(`--xla_cpu_use_fusion_emitters=false`): measured on the objective's compile, 1/3 and then another half
less time. XLA's own HLO optimisations still run, the numbers the tests check agree with the default
flags to the digits they report (docs/results.md, parity table), and runs compared bitwise are compiled with the
same flags. Set either flag in XLA_FLAGS to override it.
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
  _flags += ' --xla_force_host_platform_device_count=8'
if '--xla_backend_optimization_level' not in _flags:
  _flags += ' --xla_backend_optimization_level=0'
if '--xla_cpu_use_fusion_emitters' not in _flags:
  _flags += ' --xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = _flags.strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after XLA_FLAGS)

_CACHE = pathlib.Path(os.environ.get('UDI_TEST_JAX_CACHE',
                                     pathlib.Path(__file__).resolve().parents[1] / '.jax_cache'))
jax.config.update('jax_compilation_cache_dir', str(_CACHE))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


import pytest  # noqa: E402

# The costliest work units first, so that the two workers finish together (seconds of one unit alone on
# the 2-core CI machine, cold: ~65, 60, 45, 40 for the four subprocess tests marked slow, each its own unit so
# that they can run on different workers; then the shared run's tests and the modules, ~90 to 30).
LONGEST_FIRST = ('test_device_check_runs_every_stage_on_the_cpu',
                 'test_reproduction_notebook_resumes_after_a_disconnect_and_finishes',
                 'test_colab_notebook_runs_end_to_end_on_the_cpu',
                 'test_two_processes_over_localhost_equal_one_process', 'tiny_run', 'tests.test_run_anywhere',
                 'tests.test_training_run', 'tests.test_train_step', 'tests.test_models', 'tests.test_devices',
                 'tests.test_ablations', 'tests.test_objective_forms', 'tests.test_faults',
                 'tests.test_golden_parity', 'tests.test_reproduce', 'tests.test_metrics_log')


def work_unit(item) -> str:
  """The pytest-xdist work unit of a test (`--dist loadgroup`): every test that uses the shared run goes to
  one worker, so the run is trained once; a test marked slow (a subprocess of its own, no shared fixture)
  is a unit alone; the other tests of a module stay together, so module fixtures are built once."""
  if 'tiny_run' in getattr(item, 'fixturenames', ()):
    return 'tiny_run'
  if item.get_closest_marker('slow') is not None:
    return item.name
  return item.module.__name__


def pytest_itemcollected(item):
  item.add_marker(pytest.mark.xdist_group(work_unit(item)))   # before xdist reads the groups


def pytest_collection_modifyitems(items):
  order = lambda item: (LONGEST_FIRST.index(work_unit(item)) if work_unit(item) in LONGEST_FIRST
                        else len(LONGEST_FIRST))
  items.sort(key=order)                           # stable: the order within a unit is kept


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """The shared tiny training run (docs/design.md, contract 12): `tests/tiny_train_config.py` as it is (3 epochs of
  4 steps, a checkpoint and a log line every step) trained in this process on the 8 simulated devices,
  with k-NN every 2 epochs and after the last, and the end-of-training report (k-NN table, pictures, timm export).
  Subprocess runs of the same config on 8 devices compile the same step (the persistent cache) and
  continue or reproduce it exactly. Returns (config, workdir)."""
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from tests import tiny_train_config
  from udi_jax.evaluate.report import final_report
  from udi_jax.train.loop import train_and_evaluate
  config = tiny_train_config.get_config()
  config.eval.knn_every_epochs = 2        # k-NN during training (epochs 0, 2 and the last), with the diagnostics
  config.eval.protocols = ('knn', 'diagnostics')
  config.eval.tokens = ('cls', 'cls_plus', 'concat')
  workdir = tmp_path_factory.mktemp('tiny_run')
  result = train_and_evaluate(config, str(workdir))
  assert result.completed
  final_report(config, result.trainer.nets, result.state, workdir,   # the demo's table and pictures
               result.trainer.schedules.steps_per_epoch)
  return config, workdir
