"""Session-wide test setup; runs before jax initialises."""

import os

# Eight emulated CPU devices for the sharding, pmap and shard_map tests; must be
# set before jax creates its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
