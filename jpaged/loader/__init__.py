"""Weight and config loaders: HF safetensors and GGUF files into engine-ready arrays."""
