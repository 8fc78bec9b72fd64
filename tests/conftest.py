"""Test session setup: 8 simulated CPU devices and a persistent compilation cache (DESIGN contract 12).

XLA_FLAGS must be set before JAX initialises its backends, hence at import time of this file.
"""

import os
import pathlib

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
