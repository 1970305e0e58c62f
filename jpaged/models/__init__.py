"""Model definitions consumed by the model runner."""
