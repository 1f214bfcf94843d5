"""Train the built-in model: a small Llama on the synthetic world, saved like any Hugging Face checkpoint.

Training is the same bit for bit wherever it runs: on the CPU, with one thread and deterministic
algorithms, seeded. The default model's trained weights ship with the package (patchmap/shipped.py), and
are used instead of training when a config asks for exactly the spec they were trained from."""

import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from . import synthetic
from .errors import UserError
from .shipped import training_spec
from .storage import atomic_directory

log = logging.getLogger(__name__)
TRAINING_THREADS = 1  # a tiny model gains nothing from more, and one thread fixes the float sums' order


def word_tokenizer(vocab):
    """A word-level fast tokenizer (offset mappings included) that starts every text with <bos>."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab.index("<bos>"))])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="right")


def llama_config(tokenizer, layers, hidden, heads, mlp, max_positions=64):
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False)


def question_batches(world, tokenizer, batch_size=512):
    """All question prompts, with their answer token ids, batched for evaluation."""
    rows = synthetic.facts(world)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
        answers = torch.tensor(tokenizer.convert_tokens_to_ids([r["attribute"] for r in chunk]))
        yield enc, answers


@torch.no_grad()
def question_accuracy(model, world, tokenizer):
    model.eval()
    correct = total = 0
    for enc, answers in question_batches(world, tokenizer):
        logits = model(**enc).logits
        last = enc["attention_mask"].sum(1) - 1
        predicted = logits[torch.arange(len(last)), last].argmax(-1)
        correct += (predicted == answers).sum().item()
        total += len(answers)
    model.train()
    return correct / total


def weights_sha256(state_dict):
    """sha256 of the weights: every tensor's name and raw bytes, in name order (independent of the
    file format, so a saved checkpoint and the model in memory give the same hash)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()








@contextmanager
def deterministic_cpu():
    """One torch thread, deterministic algorithms and a forked global RNG; the caller's settings are
    restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TRAINING_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train_builtin(out_dir, world_settings, model_settings, train_settings, name="builtin"):
    """Train on the CPU until every question prompt is answered; save the model, tokenizer and
    training.json (with the spec and the weights' sha256). Reaching the step cap first is a UserError,
    and nothing is written."""
    with deterministic_cpu():
        model, tokenizer, summary = train_deterministic(world_settings, model_settings, train_settings)
    target = train_settings["target_accuracy"]
    if summary["question_accuracy"] < target:
        raise UserError(
            f"training '{name}' reached its step cap ({summary['steps']} steps) with question accuracy "
            f"{summary['question_accuracy']:.4f}, below the target {target}; raise "
            f"models.{name}.builtin.train.max_steps")
    summary.update(spec=training_spec(world_settings, model_settings, train_settings),
                   weights_sha256=weights_sha256(model.state_dict()), torch_version=torch.__version__)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "training.json").write_text(json.dumps(summary, indent=1))
    return summary


def train_deterministic(world_settings, model_settings, train_settings):
    """The training loop; call it inside deterministic_cpu()."""
    seed = train_settings["seed"]
    torch.manual_seed(seed)
    world = synthetic.make_world(**world_settings)
    tokenizer = word_tokenizer(synthetic.vocabulary(world))
    model = LlamaForCausalLM(llama_config(tokenizer, **model_settings))
    steps, batch_size = train_settings["max_steps"], train_settings["batch_size"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_settings["lr"],
                                  weight_decay=train_settings["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train_settings["schedule_steps"]))
    rng = np.random.default_rng(seed)
    history, accuracy, start = [], 0.0, time.time()
    model.train()
    bar = tqdm(range(1, steps + 1), desc="train", unit="step", mininterval=2)
    for step in bar:
        texts = [synthetic.training_text(world, rng) + " <eos>" for _ in range(batch_size)]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % train_settings["eval_every"] == 0 or step == steps:
            accuracy = question_accuracy(model, world, tokenizer)
            history.append({"step": step, "loss": round(loss.item(), 4), "accuracy": accuracy})
            bar.set_postfix(loss=f"{loss.item():.3f}", accuracy=f"{accuracy:.3f}")
            log.info("step %d loss %.4f question accuracy %.4f", step, loss.item(), accuracy)
            if accuracy >= train_settings["target_accuracy"]:
                break
    bar.close()
    model.eval()
    summary = {"steps": step, "question_accuracy": accuracy, "seconds": round(time.time() - start, 1),
               "target_accuracy": train_settings["target_accuracy"], "threads": TRAINING_THREADS,
               "history": history}
    return model, tokenizer, summary


def lr_factor(schedule_steps, warmup=0.05, floor=0.1):
    """The learning rate's factor at each step: a linear warm-up, a cosine decay to `floor` at
    schedule_steps, then `floor` for good. The cap (max_steps) only stops training: raising it lets a
    run go on without changing its first steps."""
    warmup_steps = max(1, round(warmup * schedule_steps))

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = min(1.0, (step - warmup_steps) / max(1, schedule_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))

    return factor
