"""CacheBlend quality and cost against full prefill, on a locally built random-weight model.

Each prompt is `<s> doc1 SEP doc2 SEP doc3 SEP question`; every document was prefilled alone at
positions 0..n-1 and cached (that prefill is not timed: it is the cache). For each ratio,
`blend_prefill` is compared with a full prefill of the same prompt:

  * KV relative error: ||blend - full|| / ||full|| over all layers, tokens, K and V;
  * top-1 match rate of the last token's logits over the prompts, and KL(full || blend) of the
    last-token distributions (mean over prompts, nats);
  * cost: median over (prompt, round) of wall time of `blend_prefill` / wall time of `prefill`
    measured back to back in the same round; the recomputed-token fraction after the check
    layer; and the FLOP proxy (token-layer steps run / L * T).

Ratio 0 is full reuse (only separators, question and last token recomputed); a random selection
at the same budget ("random@r") shows what the deviation ranking itself buys.

    PYTHONPATH=. python bench/bench_blend.py [--prompts 8] [--reps 5] [--threads 1] [--no-csv]

Appends rows (device, versions, date, op, impl, value) to bench/results_blend.csv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from lmcache_triton.blend.blender import blend_prefill, prefill_segment
from lmcache_triton.blend.model import load_hf_weights, prefill
from lmcache_triton.testing.tiny_model import build_tiny_model, sample_prompt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_csv, device_name  # noqa: E402

RESULTS_CSV = Path(__file__).with_name("results_blend.csv")
CSV_FIELDS = ["device", "versions", "date", "op", "impl", "value"]
RATIOS = [0.0, 0.05, 0.15, 0.3, 1.0]
MODEL = dict(arch="llama", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
             intermediate_size=512, initializer_range=0.15, seed=0)


def _time_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _build_prompts(model_dir: Path, num_prompts: int, doc_tokens: int, q_tokens: int):
    """(token_ids [T], spans of the cached documents) per prompt."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    enc = lambda text: tok.encode(text, add_special_tokens=False).ids
    bos = tok.token_to_id("<s>")
    sep = enc(" # # ")
    prompts = []
    for p in range(num_prompts):
        docs = [enc(sample_prompt(model_dir, doc_tokens + 13 * d, seed=100 * p + d)) for d in range(3)]
        question = enc(sample_prompt(model_dir, q_tokens, seed=10_000 + p))
        ids, spans = [bos], []
        for d in docs:
            spans.append((len(ids), len(ids) + len(d)))
            ids += d + sep
        ids += question
        prompts.append((torch.tensor(ids), spans))
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=110)
    ap.add_argument("--question-tokens", type=int, default=24)
    ap.add_argument("--reps", type=int, default=5, help="timing rounds over all prompts (median)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; default 1: steadier than 2 on a shared 2-vCPU VM")
    ap.add_argument("--model-dir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_blend_")
        args.model_dir = Path(tmp.name) / "model"
    model_dir = build_tiny_model(args.model_dir, **MODEL)
    w = load_hf_weights(model_dir)
    prompts = _build_prompts(model_dir, args.prompts, args.doc_tokens, args.question_tokens)
    lengths = [len(ids) for ids, _ in prompts]
    print(f"model: {MODEL}\nprompts: {len(prompts)}, tokens {min(lengths)}..{max(lengths)}, "
          f"3 cached documents each; check layer 1; deviation on K and V")

    cases = [(f"{r:g}", dict(ratio=r)) for r in RATIOS]
    rand_gen = torch.Generator().manual_seed(0)
    cases.insert(3, ("random@0.15", dict(
        ratio=0.15, select_fn=lambda d, k: torch.randperm(d.numel(), generator=rand_gen)[:k])))
    stats = {name: {"kv": [], "top1": [], "kl": [], "frac": [], "flop": [], "rel_t": []} for name, _ in cases}
    prepared = []
    for ids, spans in prompts:
        full_logits, full_kv = prefill(w, ids)
        segs = [prefill_segment(w, ids, s, e) for s, e in spans]
        prepared.append((ids, segs))
        den = sum(k.pow(2).sum() + v.pow(2).sum() for k, v in full_kv)
        logp_full = F.log_softmax(full_logits.double(), -1)
        for name, kw in cases:
            res = blend_prefill(w, ids, segs, **kw)
            num = sum((k - fk).pow(2).sum() + (v - fv).pow(2).sum()
                      for (k, v), (fk, fv) in zip(res.kv, full_kv, strict=True))
            logp = F.log_softmax(res.logits_last.double(), -1)
            st = stats[name]
            st["kv"].append((num / den).sqrt().item())
            st["top1"].append(float(res.logits_last.argmax() == full_logits.argmax()))
            st["kl"].append((logp_full.exp() * (logp_full - logp)).sum().item())
            st["frac"].append(res.recompute_fraction)
            st["flop"].append(res.flop_fraction)

    # Timing, interleaved: each round times the full prefill and every case back to back on the
    # same prompt, and the ratio is taken within the round. This VM's speed swings by 10x between
    # seconds (neighbouring jobs), so separate medians of separate phases would mostly measure that.
    full_ms = []
    for _ in range(args.reps):
        for ids, segs in prepared:
            t_full = _time_ms(lambda ids=ids: prefill(w, ids))
            full_ms.append(t_full)
            for name, kw in cases:
                t = _time_ms(lambda ids=ids, segs=segs, kw=kw: blend_prefill(w, ids, segs, **kw))
                stats[name]["rel_t"].append(t / t_full)

    mean = statistics.fmean
    full_med = statistics.median(full_ms)
    header = ("ratio", "KV rel err", "top-1 match", "KL (nats)", "recompute frac", "FLOP proxy",
              "time / full")
    rows = []
    for name, _ in cases:
        st = stats[name]
        rows.append((name, mean(st["kv"]), mean(st["top1"]), mean(st["kl"]), mean(st["frac"]),
                     mean(st["flop"]), statistics.median(st["rel_t"])))
    print(f"full prefill: median {full_med:.2f} ms per prompt")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.2f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.2f} |")

    if not args.no_csv:
        device = device_name()
        versions = (f"torch {torch.__version__}; triton {triton.__version__}; "
                    f"python {sys.version.split()[0]}")
        date = dt.date.today().isoformat()
        out = []
        for r in rows:
            for metric, value in zip(("kv_rel_err", "top1_match", "kl_nats", "recompute_frac", "flop_proxy",
                                      "time_vs_full"), r[1:], strict=True):
                out.append(dict(device=device, versions=versions, date=date, op=f"blend_{metric}",
                                impl=f"ratio={r[0]}", value=f"{value:.4g}"))
        out.append(dict(device=device, versions=versions, date=date, op="blend_full_prefill_ms",
                        impl="prefill", value=f"{full_med:.4g}"))
        append_csv(RESULTS_CSV, CSV_FIELDS, out)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
