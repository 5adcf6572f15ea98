"""Quantize a sentence-embedding transformer with lowbit and see what it costs: fidelity, size, speed.

The encoder is a Hugging Face ``BertModel`` built from a config (random weights: nothing is downloaded);
the text is real, tokenizer-free: every sentence is its UTF-8 bytes (ids 3..258, as byte-level models
read text) between [CLS]=1 and [SEP]=2, padded with 0 and masked. A sentence embedding is the mean of
the last hidden state over the sentence's tokens.

For each method that works on any model without a graph (``dynamic`` per tensor and per token,
``weight_only``, ``float16``) and for ``static`` (torch.export graph, float islands), it prints the
cosine similarity of the sentence embeddings to the float model's (and the worst token), the file size
against the float file, and the latency against the float model and torch's ``quantize_dynamic``
(interleaved, median). Usage::

    .venv/bin/python examples/sentence_embeddings.py            # 4 layers, hidden 256
    .venv/bin/python examples/sentence_embeddings.py --layers 6 --hidden 768 --heads 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization makes trained networks small and fast on ordinary processors.",
    "A transformer encoder maps a sentence to one vector per token.",
    "Integer kernels multiply eight-bit codes and accumulate in thirty-two bits.",
    "The weather in the mountains changes quickly in the afternoon.",
    "She read the letter twice before putting it back in the envelope.",
    "Most int8 deployments on CPUs today are transformer encoders.",
    "Rivers carry sediment from the hills down to the sea.",
]


def encode(sentences: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level token ids [N, length] and the attention mask."""
    ids = torch.zeros(len(sentences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sentences):
        toks = [1, *(b + 3 for b in s.encode("utf-8"))][: length - 1] + [2]
        ids[i, : len(toks)] = torch.tensor(toks)
        mask[i, : len(toks)] = 1
    return ids, mask


def embed(out: object, mask: torch.Tensor) -> torch.Tensor:
    h = out["last_hidden_state"]  # a ModelOutput, or the dict a captured graph returns
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def median_ms(fns: dict, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for f in fns.values():
        f()
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="quantize a sentence-embedding transformer; fidelity, size, speed")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--length", type=int, default=128, help="tokens per sentence (padded)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)

    from transformers import BertConfig, BertModel

    import lowbit

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     intermediate_size=4 * args.hidden, vocab_size=259, max_position_embeddings=max(512, args.length))
    model = BertModel(cfg).eval()
    ids, mask = encode(SENTENCES, args.length)
    example = (ids[:1], mask[:1])
    with torch.inference_mode():
        ref_tokens = model(ids, mask)["last_hidden_state"]
        ref = embed(model(ids, mask), mask)

    models = {"float": model}
    for name, opts in (("dynamic", {}), ("dynamic per-token", {"per_token": True}), ("weight_only", {}),
                       ("float16", {})):
        models[name] = lowbit.quantize(model, name.split()[0], example_input=example, **opts)
    models["static"] = lowbit.quantize(model, "static", calib=[(ids, mask)], example_input=example, progress=False)
    models["torch quantize_dynamic"] = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                                              dtype=torch.qint8)

    with tempfile.TemporaryDirectory() as d:
        float_file = Path(d) / "float.pt"
        torch.save(model.state_dict(), float_file)
        sizes = {"float": float_file.stat().st_size}
        for name, m in models.items():
            if name not in ("float", "torch quantize_dynamic"):
                sizes[name] = lowbit.save(m, Path(d) / f"{name.replace(' ', '_')}.lowbit").stat().st_size

    def run(m: torch.nn.Module) -> None:
        with torch.inference_mode():
            m(ids, mask)

    lat = median_ms({k: (lambda m=m: run(m)) for k, m in models.items()}, args.rounds)
    print(f"BERT encoder: {args.layers} layers, hidden {args.hidden}, {len(SENTENCES)} sentences x {args.length} "
          f"byte tokens, {args.threads} thread(s), lowbit kernels {lowbit.kernels.backend_name()}\n")
    print(f"{'model':24s} {'embedding cos':>13s} {'worst token':>11s} {'file':>10s} {'x float':>7s} "
          f"{'latency ms':>10s} {'x float':>7s}")
    with torch.inference_mode():
        for name, m in models.items():
            out = m(ids, mask)
            cos = float(F.cosine_similarity(embed(out, mask), ref, dim=-1).min())
            tok = F.cosine_similarity(out["last_hidden_state"], ref_tokens, dim=-1)[mask.bool()].min()
            size = sizes.get(name)
            size_s = f"{size:10,d} {size / sizes['float']:7.3f}" if size else f"{'':10s} {'':7s}"
            print(f"{name:24s} {cos:13.5f} {float(tok):11.5f} {size_s} {lat[name]:10.2f} "
                  f"{lat[name] / lat['float']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
