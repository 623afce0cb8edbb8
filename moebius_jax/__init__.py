"""moebius-jax: Moebius inpainting in JAX/Flax."""
