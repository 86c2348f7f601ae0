"""Model file formats: index the bytes of GGUF files and safetensors checkpoints; nothing computes here."""
