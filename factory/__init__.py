"""The generation factory: manifests on object storage -> Ray actors pinned to
GPUs -> OME-Zarr volumes with labels and provenance, exactly once."""
