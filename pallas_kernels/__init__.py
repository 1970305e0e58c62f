"""Pallas GPU kernels and their pure-jnp references."""
