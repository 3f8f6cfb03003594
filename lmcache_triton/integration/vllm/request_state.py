"""The scheduler's per-request state, and what a vLLM request says about its own keys and saving.

Primitives:
  `RequestState`                  the scheduler connector's view of one live request: its chunk
                                  spans, blocks, how many leading chunks are handled, its opt-out
                                  and the stores planned of it (CacheBlend's planner reads and
                                  updates it too).
  `extra_keys(request)`           what besides the tokens decides the KV (LoRA adapter, cache
                                  salt, multimodal ids): folded into every chunk key.
  `skip_save_requested(request)`  the per-request opt-out (`{"lmcache.skip_save": true}` in
                                  `kv_transfer_params`).

Reads vLLM's `Request` by attribute only (no vLLM import at run time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmcache_triton.engine import ChunkSpan

if TYPE_CHECKING:
    from vllm.v1.request import Request

SKIP_SAVE_PARAM = "lmcache.skip_save"  # LMCache's spelling of the per-request opt-out


def skip_save_requested(request: Request) -> bool:
    """Whether the request's `kv_transfer_params` ask that its KV is never stored (LMCache's
    `{"lmcache.skip_save": true}`; true, "true", 1 and "1" count). Loads still happen."""
    params = getattr(request, "kv_transfer_params", None)
    if not isinstance(params, dict):
        return False
    v = params.get(SKIP_SAVE_PARAM, False)
    return v is True or v == 1 or (isinstance(v, str) and v.strip().lower() in ("true", "1", "yes"))


def extra_keys(request: Request) -> list[str]:
    """What besides the tokens decides the KV: LoRA adapter, cache salt, multimodal inputs."""
    extra = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        extra.append(f"lora:{lora.lora_name}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        extra.append(f"salt:{salt}")
    for f in getattr(request, "mm_features", None) or []:
        extra.append(f"mm:{f.identifier}")
    return extra


@dataclass
class RequestState:
    """The scheduler's view of one live request (CacheBlend's planner reads and updates it)."""

    spans: list[ChunkSpan]
    prompt_len: int
    request: Request | None = None  # vLLM's Request (its all_token_ids grows while decoding)
    extra: list[str] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_handled: int = 0  # leading chunks already stored, loaded or known cached
    skip_save: bool = False  # kv_transfer_params {"lmcache.skip_save": true}: never stored
    stores_planned: int = 0  # stores of its blocks sent to the workers
    tail: ChunkSpan | None = None  # a stored shorter chunk that the lookup hit in place of the next one
