"""DeepSpeed training of the VAE and the latent diffusion model, and the data
they learn from (the CT-RATE reader and the chest phantom world)."""
