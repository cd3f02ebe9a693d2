"""A reference consumer of the VAE: a small conditional latent diffusion model in RadioDiff's
setting (condition: building mask and transmitter map; target: the radio map's latent),
trained from `python -m export latents` shards through export.latent_shards.LatentShards,
sampled with DDIM in a few steps, and decoded through a running server's /decode, as a
user's LDM would. `python -m examples.ldm --help`; docs/ldm.md, "Handoff".

Modules: conditions (condition maps at latent resolution), unet (the denoiser), diffusion
(schedule, loss, DDIM), data (shards + conditions), serve (a server process and its client),
evaluate (held-out metrics under both definitions), train (the loop and its curves),
__main__ (the one command)."""
