"""Weights on disk: tensor stores over safetensors, ``.pth`` and GGUF files, single-file
formats and their rename tables, strict loading of a model folder, the bf16 cast cache,
LoRA files and the random-weight checkpoints in the real layouts."""
