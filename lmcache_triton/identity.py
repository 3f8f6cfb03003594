"""What produced the KV: a cheap, process-stable fingerprint of the model's weights.

Chunk keys carry it (`hashing.key_namespace`), so replacing the weights under the same path --
a model directory updated in place, a symlink switched to another snapshot -- makes every old
chunk a miss instead of serving the old model's KV to the new one.

For a local directory the fingerprint covers the files that decide the KV: every weight file
(`*.safetensors`, `*.bin`, `*.pt`, `*.pth`, `*.gguf`, their index files) and the configuration
(`config.json`, `generation_config.json`, `params.json`, quantisation configs), by name, size
and modification time in nanoseconds, read through symlinks, from the directory the path
resolves to. No file is read: a stat per file, microseconds for a 30-shard checkpoint. (A
content hash would survive a copy with new mtimes, but reading 16-140 GB at every start-up is
not an option; a copy is a miss, which is safe.) For a hub id it is the id and the revision.

Imports nothing but the standard library.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")
_CONFIG_NAMES = {
    "config.json",
    "generation_config.json",
    "params.json",
    "quantize_config.json",
    "quant_config.json",
    "hf_quant_config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
}


def _relevant(name: str) -> bool:
    return name in _CONFIG_NAMES or name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def model_fingerprint(model: str, revision: str | None = None) -> str:
    """A 32-hex-digit fingerprint of the weights `model` names.

    Args:
        model: a local model directory (or a file), or a hub id.
        revision: the hub revision vLLM loads (`model_config.revision`); None for local models.

    Returns:
        The same digest in every process for the same files; a different one when any weight or
        configuration file is added, removed, resized or rewritten, or when the path resolves
        elsewhere.
    """
    h = hashlib.blake2b(digest_size=16)
    path = Path(model)
    if path.exists():
        real = path.resolve()
        h.update(b"local\0" + str(real).encode() + b"\0")
        entries = [real] if real.is_file() else sorted(p for p in real.iterdir() if _relevant(p.name))
        for p in entries:
            try:
                st = os.stat(p)  # through symlinks (HF cache snapshots link into blobs)
            except OSError:
                continue
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    else:
        h.update(b"hub\0" + model.encode() + b"\0" + (revision or "main").encode())
    return h.hexdigest()
