"""A tiny random BGE-M3 folder for the similarity-reward tests: an XLM-RoBERTa encoder, a word-level tokenizer with
BGE-M3's special-token ids, and the colbert / sparse heads saved as FlagEmbedding saves them (Linear state dicts in
`colbert_linear.pt` and `sparse_linear.pt`)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

WORDS = ("kate said that you feel unheard i am not sure what to say how are the weather is nice today tell me more "
         "about it really sorry hear lost your job this week").split()
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # XLM-RoBERTa's ids 0-3: CLS, PAD, EOS, UNK
HIDDEN = 32


def write_tiny_bge_m3(root: Path, seed: int = 0) -> Path:
    vocab = {token: i for i, token in enumerate([*SPECIALS, *sorted(set(WORDS)), "?", ".", ","])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", cls_token="<s>", eos_token="</s>",
                            sep_token="</s>", pad_token="<pad>", unk_token="<unk>").save_pretrained(root)
    torch.manual_seed(seed)
    # initializer_range 0.3: distinct texts get distinct CLS states (at 0.02 every dense cosine is ~1)
    config = XLMRobertaConfig(vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=514, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, initializer_range=0.3)
    XLMRobertaModel(config).save_pretrained(root)
    colbert, sparse = torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Linear(HIDDEN, 1)
    with torch.no_grad():
        sparse.bias.fill_(0.5)  # most tokens get a positive lexical weight, as with the real head
    torch.save(colbert.state_dict(), root / "colbert_linear.pt")
    torch.save(sparse.state_dict(), root / "sparse_linear.pt")
    return root
