"""gce_jax: Guided Complement Entropy in JAX."""
