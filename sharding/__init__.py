"""Device meshes and partition rules for tensor, pipeline and expert parallel layouts."""
