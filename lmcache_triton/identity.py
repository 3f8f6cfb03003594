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
not an option; a copy is a miss, which is safe.) Python files count too: with
`trust_remote_code` the model's own code computes the KV. Tokenizer files do not: chunk keys hash
token ids, so a new tokenizer already yields new keys.

For a hub id it is the id, the revision and the code revision, plus the commit the revision
points to in the local Hugging Face cache (`refs/<revision>`, read from disk, no network), so a
branch such as `main` that moved between two downloads is a new model.

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
    return (
        name in _CONFIG_NAMES
        or name.endswith(_WEIGHT_SUFFIXES)
        or name.endswith(".index.json")
        or name.endswith(".py")  # remote code (trust_remote_code) computes the KV too
    )


def hub_cache_dirs(download_dir: str | None = None) -> list[Path]:
    """Where Hugging Face snapshots of hub ids may live: `download_dir` (vLLM's
    `--download-dir`), then `HF_HUB_CACHE`, `HF_HOME/hub`, `XDG_CACHE_HOME/huggingface/hub`."""
    dirs = [Path(download_dir)] if download_dir else []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    dirs.append(Path(home) / "hub")
    return dirs


def _hub_commit(model: str, revision: str | None, download_dir: str | None) -> str:
    """The commit `revision` of hub id `model` points to in a local cache, or "" if unknown."""
    rev = revision or "main"
    if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev):
        return rev  # already a commit
    repo = "models--" + model.replace("/", "--")
    for d in hub_cache_dirs(download_dir):
        try:
            return (d / repo / "refs" / rev).read_text().strip()
        except (OSError, ValueError):
            continue
    return ""


def model_fingerprint(
    model: str,
    revision: str | None = None,
    code_revision: str | None = None,
    download_dir: str | None = None,
) -> str:
    """A 32-hex-digit fingerprint of the weights `model` names.

    Args:
        model: a local model directory (or a file), or a hub id.
        revision: the hub revision vLLM loads (`model_config.revision`); default None ("main").
            Ignored for local models.
        code_revision: the hub revision of the model code (`model_config.code_revision`);
            default None. Ignored for local models (their `*.py` files are stat'ed).
        download_dir: vLLM's `load_config.download_dir`, searched first for the hub cache;
            default None.

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
        try:
            entries = [real] if real.is_file() else sorted(p for p in real.iterdir() if _relevant(p.name))
        except OSError:  # unreadable: vLLM cannot load it either; the resolved path still keys it
            entries = []
        for p in entries:
            try:
                st = os.stat(p)  # through symlinks (HF cache snapshots link into blobs)
            except OSError:
                continue
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    else:
        commit = _hub_commit(model, revision, download_dir)
        for part in ("hub", model, str(revision or "main"), str(code_revision or ""), commit):
            h.update(part.encode() + b"\0")
    return h.hexdigest()
