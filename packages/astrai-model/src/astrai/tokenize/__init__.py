"""Tokenisation: `AutoTokenizer` over Hugging Face `tokenizers`, chat templates, streaming detokenisation, BPE training."""

from astrai.tokenize.bpe import train_bpe_tokenizer
from astrai.tokenize.chat_template import ChatTemplate
from astrai.tokenize.detokenize import IncrementalDetokenizer
from astrai.tokenize.tokenizer import AutoTokenizer

__all__ = ["AutoTokenizer", "ChatTemplate", "IncrementalDetokenizer", "train_bpe_tokenizer"]
