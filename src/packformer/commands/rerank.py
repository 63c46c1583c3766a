"""`packformer rerank`: documents ranked against a query by a cross-encoder, best first."""
from __future__ import annotations

import json

from .common import POSITIVE, add_model_options, load_model


def add_parser(sub):
    p = sub.add_parser("rerank", help="rank documents against a query with a cross-encoder",
                       description="Score (query, document) pairs with a cross-encoder (a sentence-transformers "
                                   "CrossEncoder folder, a *ForSequenceClassification folder with one label, or a "
                                   "Qwen3-Reranker folder) and print the documents best first.")
    add_model_options(p)
    p.add_argument("--query", "-q", required=True, help="the query")
    p.add_argument("documents", nargs="*", help="documents to rank")
    p.add_argument("--input", "-i", default=None, help="a file with one document per line, or - for stdin")
    p.add_argument("--top-k", type=POSITIVE, default=None, help="print only the best N (default: all)")
    p.add_argument("--raw-scores", action="store_true", help="logits instead of the model's activation (Sigmoid)")
    p.add_argument("--no-truncate", action="store_true", help="fail on over-long pairs instead of truncating")
    p.add_argument("--batch-size", type=POSITIVE, default=None, help="max pairs per batch (on top of the token budget)")
    p.add_argument("--json", action="store_true", help="print [{corpus_id, score, text}] as JSON")
    p.add_argument("--instruction", default=None, help="a decoder reranker's (Qwen3-Reranker) instruction "
                   "(default: the model card's web-search one)")
    return p


def run(args) -> int:
    from torch import nn

    from ..rerank import CrossEncoderModel
    from .common import read_texts

    args.texts = args.documents
    documents = read_texts(args)
    model = load_model(args)
    if not isinstance(model, CrossEncoderModel):
        kind = "classifier" if model.head is not None else "embedding"
        raise ValueError(f"{model.source} is an {kind} model; rerank needs a cross-encoder (a CrossEncoder folder, "
                         "a *ForSequenceClassification folder with one label, or a Qwen3-Reranker folder)")
    results = model.rank(args.query, documents, top_k=args.top_k, return_documents=True, batch_size=args.batch_size,
                         activation_fn=nn.Identity() if args.raw_scores else None, truncate=not args.no_truncate,
                         instruction=args.instruction)
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
        return 0
    for rank, r in enumerate(results, 1):
        print(f"{rank:>4}  {r['score']:.6f}  [{r['corpus_id']}]  {r['text']}")
    return 0
