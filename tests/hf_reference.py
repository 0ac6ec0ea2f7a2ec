"""What the Hugging Face tests share: tiny random models of every architecture `simulate` accepts, a
tokenizer trained offline, a prompt/response file, and the reference every executor run is held
to, a plain transformers training loop.

The reference is what a user would write without tiertune: `AutoModelForCausalLM.from_pretrained`,
one autograd graph, `torch.optim.AdamW` with the usual no-decay group (norms, biases) when the
config decays only matrices, transformers' own `get_scheduler` for the warm-up and decay, the same
batches with their attention masks, gradient accumulation with each micro-batch's loss summed over
its loss-carrying targets and divided by the step's count (one big batch's mean).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from tiertune.executor.data import IGNORE
from tiertune.executor.updates import OptimConfig

QA = [("what does the cat eat ?", "the cat eats fish ."),
      ("what does the dog eat ?", "the dog eats meat and bones ."),
      ("where does the cat sleep ?", "on the warm mat by the door ."),
      ("where does the dog sleep ?", "in the garden ."),
      ("who feeds the cat ?", "the old man feeds the cat every morning ."),
      ("who walks the dog ?", "the girl walks the dog ."),
      ("what colour is the cat ?", "black and white ."),
      ("what colour is the dog ?", "brown .")]
TEXTS = ["the cat and the dog are friends .", "every morning the old man opens the door ."]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]          # ids 0..3: unk, BOS, EOS, pad
BOS, EOS, PAD = 1, 2, 3
VOCAB = 96                                           # the tiny models' (the tokenizer needs fewer)
SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def save_tokenizer(path: str | Path) -> int:
    """A word-level tokenizer trained on QA and TEXTS (BOS added, EOS and pad defined), saved as
    transformers saves a fast tokenizer; returns its vocabulary size."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([f"{q} answer : {a}" for q, a in QA] + TEXTS,
                            trainers.WordLevelTrainer(special_tokens=SPECIAL))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return len(fast)


def write_chat(path: str | Path) -> Path:
    """A prompt/response .jsonl with a few plain texts among the pairs."""
    rows = [{"prompt": q + " answer :", "response": a} for q, a in QA] + [{"text": t} for t in TEXTS]
    Path(path).write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return Path(path)


IDS = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, **IDS)

ARCHS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        intermediate_size=64, num_key_value_heads=2, **SMALL)),
    "llama-tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(     # Llama 3.2 style
        intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True, **SMALL)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        intermediate_size=64, num_key_value_heads=2, sliding_window=32, **SMALL)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(      # qkv biases
        intermediate_size=64, num_key_value_heads=2, **SMALL)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(            # tied
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, **IDS)),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        intermediate_size=64, rotary_pct=0.5, **SMALL)),
    "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(                # tied
        ffn_dim=64, dropout=0.0, attention_dropout=0.0, **SMALL)),
}


def save_model(name: str, path) -> str:
    """ARCHS[name] with perturbed weights and the tokenizer, as save_pretrained writes them."""
    torch.manual_seed(0)
    model = ARCHS[name]()
    with torch.no_grad():                       # break the init's symmetries (zero biases, unit norms)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    assert save_tokenizer(path) <= VOCAB
    return str(path)


def plain_hf_loop(model_dir, steps, optim: OptimConfig, accum: int = 1) -> list[float]:
    """Losses of the plain transformers loop over `steps` (executor/data.py Batches, each
    `accum` micro-batches), with `optim`'s AdamW settings, decay groups and schedule."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    params = list(model.parameters())                 # a tied matrix appears once
    decayed = [p for p in params if optim.decay_vectors or p.dim() >= 2]
    groups = [{"params": decayed, "weight_decay": optim.weight_decay},
              {"params": [p for p in params if all(p is not q for q in decayed)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    sched = transformers.get_scheduler(SCHEDULER_NAMES[optim.schedule], opt, num_warmup_steps=optim.warmup_steps,
                                       num_training_steps=optim.total_steps or len(steps))
    losses = []
    for b in steps:
        count = int((b.targets != IGNORE).sum())
        total = 0.0
        for tk, tg, am in zip(b.tokens.chunk(accum), b.targets.chunk(accum), b.attention_mask.chunk(accum)):
            logits = model(input_ids=tk, attention_mask=am).logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), tg.flatten(), ignore_index=IGNORE, reduction="sum") / count
            loss.backward()
            total += loss.item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses
