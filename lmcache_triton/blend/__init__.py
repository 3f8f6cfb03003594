"""CacheBlend support that needs no kernels: segmenting prompts and keying segments."""
