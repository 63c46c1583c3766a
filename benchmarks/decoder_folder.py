"""A Qwen3-Embedding-shaped sentence-transformers folder with random weights, for end-to-end benchmarks
where the real checkpoint cannot be fetched (no model hub): the `qwen3-embedding-0.6b` preset's shapes
(families/qwen3.py), a byte-level BPE tokenizer trained on the WORKLOADS texts whose post-processor
appends <|endoftext|> (as Qwen3-Embedding's), last-token pooling and Normalize. Timing needs only the
shape; both engines read the same folder.

    python benchmarks/decoder_folder.py /tmp/qwen3-0.6b [--layers N]
    packformer bench /tmp/qwen3-0.6b --device cuda --dtype bfloat16 --workloads texts_20000 \\
        --peers sentence_transformers --batch-size 256
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch


def build(folder: Path, layers: int | None = None, seed: int = 0) -> Path:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    import packformer.families  # noqa: F401  (registers the presets)
    from packformer.bench.workloads import generate_texts
    from packformer.config import preset
    from packformer.families import family_named

    cfg = preset("qwen3-embedding-0.6b")
    if layers:
        cfg = replace(cfg, num_layers=layers)
    hf_cfg = family_named(cfg.family).to_hf_config(cfg)
    torch.manual_seed(seed)
    model = transformers.Qwen3Model(hf_cfg).to(torch.bfloat16).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(generate_texts(2000, seed=1), trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A $B <|endoftext|>",
                                                       special_tokens=[("<|endoftext|>", 0)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                         pad_token="<|endoftext|>").save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hf_cfg.hidden_size, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False, "pooling_mode_lasttoken": True,
         "include_prompt": True}))
    (folder / "2_Normalize").mkdir(exist_ok=True)
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset's 28 (a quick check)")
    a = ap.parse_args()
    print("wrote", build(a.folder, a.layers))
