"""Tiny random-weight checkpoints of several model families, each with a byte-level BPE tokenizer
trained here, saved with save_pretrained so that they load through the real from_pretrained path."""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

KNOWN_1000 = Path(__file__).resolve().parents[2] / "shared" / "data" / "known_1000.json"


NAMES = "Anna Boris Clara Dmitri Elena Farid Greta Hugo Ines Jonas Karin Luis Marta Nils Olga Pavel".split()
PLACES = "France Chile Kenya Japan Peru Norway Egypt".split()


def stand_in_facts():
    """Facts in the known_1000 format, for a machine without ../shared/data."""
    return [{"known_id": i, "subject": f"{a} {b}", "attribute": PLACES[i % len(PLACES)],
             "prompt": f"{a} {b} is a citizen of", "relation_id": "P27"}
            for i, (a, b) in enumerate((a, b) for a in NAMES for b in NAMES if a != b)]


def known_facts():
    return json.loads(KNOWN_1000.read_text()) if KNOWN_1000.exists() else stand_in_facts()


def known_facts_text():
    """Text to train a tokenizer on: the prompts and answers of the facts the tests use."""
    return [f"{r['prompt']} {r['attribute']}" for r in known_facts()]


def bpe_tokenizer(texts, vocab_size=600):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def family_model(family, vocab_size, layers=2, width=32):
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=128))
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=4,
                                          n_positions=128))
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                                                num_hidden_layers=layers, num_attention_heads=4,
                                                max_position_embeddings=128))
    raise ValueError(family)


def save_checkpoint(path, family, tokenizer, seed=0):
    torch.manual_seed(seed)
    model = family_model(family, len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
