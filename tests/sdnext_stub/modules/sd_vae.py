"""SD.Next's VAE loader state: ``loaded_vae_file`` is set when a VAE file replaced the model's own."""

loaded_vae_file = None
