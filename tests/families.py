"""Tiny random-weight models of every supported family, from one table of transformers configs
(FAMILIES), and checkpoints of them with a byte-level BPE tokenizer trained here, saved with
save_pretrained so that they load through the real from_pretrained path."""

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

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


def _llama_like(config_class, vocab_size, layers, width, **extra):
    return config_class(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=False, **extra)


# family -> (vocabulary size, layers, width) -> its transformers config
FAMILIES = {
    "llama": lambda v, l, w: _llama_like(transformers.LlamaConfig, v, l, w),
    "mistral": lambda v, l, w: _llama_like(transformers.MistralConfig, v, l, w, sliding_window=5),
    "qwen2": lambda v, l, w: _llama_like(transformers.Qwen2Config, v, l, w),
    "gemma2": lambda v, l, w: _llama_like(transformers.Gemma2Config, v, l, w, head_dim=8, sliding_window=5,
                                          final_logit_softcapping=5.0, attn_logit_softcapping=20.0,
                                          query_pre_attn_scalar=8),
    "gemma3_text": lambda v, l, w: _llama_like(transformers.Gemma3TextConfig, v, l, w, head_dim=8, sliding_window=5,
                                               final_logit_softcapping=5.0, query_pre_attn_scalar=8,
                                               layer_types=[("sliding_attention", "full_attention")[i % 2]
                                                            for i in range(l)]),
    "gpt2": lambda v, l, w: transformers.GPT2Config(vocab_size=v, n_embd=w, n_layer=l, n_head=4, n_positions=128),
    "gpt_neox": lambda v, l, w: transformers.GPTNeoXConfig(vocab_size=v, hidden_size=w, intermediate_size=2 * w,
                                                           num_hidden_layers=l, num_attention_heads=4,
                                                           max_position_embeddings=128),
    "gptj": lambda v, l, w: transformers.GPTJConfig(vocab_size=v, n_embd=w, n_layer=l, n_head=4, rotary_dim=4,
                                                    n_positions=128),
    "opt": lambda v, l, w: transformers.OPTConfig(vocab_size=v, hidden_size=w, ffn_dim=2 * w, num_hidden_layers=l,
                                                  num_attention_heads=4, max_position_embeddings=128,
                                                  word_embed_proj_dim=16),
    "phi": lambda v, l, w: transformers.PhiConfig(vocab_size=v, hidden_size=w, intermediate_size=2 * w,
                                                  num_hidden_layers=l, num_attention_heads=4,
                                                  max_position_embeddings=128),
}


def family_config(family, vocab_size, layers=2, width=32, init=None, **extra):
    """The family's config; `init`: the std of the random weights (else the family's default); `extra`:
    e.g. the tokenizer's special token ids."""
    config = FAMILIES[family](vocab_size, layers, width)
    if init is not None:
        extra.update(initializer_range=init, init_std=init)  # init_std: OPT's name for it
    config.update(extra)
    return config


def build_model(family, vocab_size, layers=2, width=32, init=None, **extra):
    """A random-weight model of the family (seed the generator first for the same weights)."""
    return transformers.AutoModelForCausalLM.from_config(family_config(family, vocab_size, layers, width, init, **extra))


def save_checkpoint(path, family, tokenizer, seed=0):
    torch.manual_seed(seed)
    model = build_model(family, len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
