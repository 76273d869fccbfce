"""Compute kernels: each ``<name>.py`` holds a Pallas kernel (where one pays), its
pure-jnp reference, and the dispatch the models call."""
