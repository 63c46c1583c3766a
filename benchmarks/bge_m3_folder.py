"""A bge-m3-shaped folder with random weights, for timing its three outputs (no model hub here): XLM-R
large (24 layers of 1024, 8,194 positions), a sentencepiece model trained on the WORKLOADS texts (XLM-R's
file name and id convention), `sparse_linear.pt` (Linear(1024, 1)) and `colbert_linear.pt` (Linear(1024,
1024)) beside the weights, as the published folder has them. Timing needs only the shapes.

    python benchmarks/bge_m3_folder.py /tmp/bge-m3 [--layers N]
    packformer bench /tmp/bge-m3 --workloads bge_m3 --texts texts.txt --iterations 3
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def build(folder: Path, layers: int = 24, seed: int = 0) -> Path:
    import sentencepiece as spm
    import transformers

    from packformer.bench.workloads import generate_texts

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(generate_texts(4000, seed=1)),
                                   model_prefix=str(folder / "sentencepiece.bpe"), vocab_size=2000,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2,
                                   hard_vocab_limit=False)   # the WORKLOADS texts hold few words
    tok = transformers.XLMRobertaTokenizer.from_pretrained(str(folder))
    cfg = transformers.XLMRobertaConfig(vocab_size=len(tok), hidden_size=1024, num_hidden_layers=layers,
                                        num_attention_heads=16, intermediate_size=4096, max_position_embeddings=8194,
                                        type_vocab_size=1, pad_token_id=1)
    torch.manual_seed(seed)
    transformers.XLMRobertaModel(cfg, add_pooling_layer=False).eval().save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    torch.save(torch.nn.Linear(1024, 1).state_dict(), folder / "sparse_linear.pt")
    torch.save(torch.nn.Linear(1024, 1024).state_dict(), folder / "colbert_linear.pt")
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--layers", type=int, default=24)
    a = ap.parse_args()
    print("wrote", build(a.folder, a.layers))
