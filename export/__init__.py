"""ONNX export of the autoencoder: `python -m export --ckpt CKPT --out DIR` (see docs/export.md).

Modules: onnx_export (trace encoder/decoder graphs), parity (onnxruntime vs torch figures),
ort_session (provider choice), precise_norm (the export-exact GroupNorm), diffusers_format
(diffusers AutoencoderKL folder), pipeline (the whole job and `--verify`), latents and
latent_shards (`python -m export latents`: a split encoded to resumable shards), radiodiff_config
(`python -m export radiodiff-config`: the first-stage block of RadioDiff's radio_train.yaml),
__main__ (the CLI). The manifest schema lives in model/manifest.py,
so the server can read an export directory without importing this package.
"""
