#!/usr/bin/env python
"""Build tiny random models of every architecture mrs supports, plus golden outputs.

These folders are the correctness oracle: each is a normal Hugging Face model folder
(config.json, safetensors, tokenizer files, generation_config.json) made with
transformers, plus a `golden.npz` of what transformers computes on it:

    decoders  logits_ids [1,T] int32, logits [1,T,V] float32   (one full forward)
              prompt_{0,1,2} [1,P] int32 (3, 9, 17 tokens, BOS first)
              greedy_{0,1,2} [64] int32  (batch 1, HF KV cache, one token per step,
                                          no EOS stop), margin_min [] float32
              phi3 also: long_logits_ids, long_logits (T > original_max_position_embeddings)
    bert      input_ids, attention_mask [3,L] int32 (padded batch), last_hidden_state
              [3,L,D] float32, embeddings [3,D] float32 (masked mean, L2-normalised);
              the texts are in texts.json beside it.

Weights are re-drawn "peaky" (larger std than transformers' 0.02 default, random norm
weights and biases) so that logits have clear winners and greedy parity is not decided
by float noise; every greedy step's top-1/top-2 margin is asserted > MIN_MARGIN.

    python scripts/make_fixtures.py [--out DIR] [--only NAME ...]

`tests/conftest.py` imports this file by path and calls `build_all` (under `locked`)
when the stamp in the output folder does not match `stamp()` (script content +
torch/transformers/tokenizers versions).
Heavy imports (torch, transformers, tokenizers) happen inside functions so that reading
the stamp is cheap.

What transformers does here that an implementation must copy to match the goldens:
- dynamic (llama-dynamic) and longrope (phi3) rope pick their frequencies per forward
  call from max(position) + 1 of that call: one 48-token forward uses the scaled/long
  frequencies for all 48 positions, while a cached decode keeps the keys it already
  rotated and switches only for new tokens (dynamic rescales at every step past 32,
  longrope uses long factors from position 32 on). So for these two fixtures the
  cached greedy run differs from an uncached recompute of the same tokens.
- longrope without a `factor` scales cos/sin by sqrt(1 + ln(max_pos / original) /
  ln(original)) = sqrt(1 + ln 4 / ln 32) here, for short and long factors alike.
- sliding_window W (mistral): query i sees keys i-W+1 .. i (W keys, itself included).
- tied models (llama, qwen2, mamba) have no lm_head.weight in their safetensors.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network

log = logging.getLogger("make_fixtures")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / ".fixtures"
STAMP_FILE = "STAMP.json"
SCRIPT_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

VOCAB = 512  # model vocab for every decoder; >= tokenizer size (unused rows exist)
GREEDY_STEPS = 64
PROMPT_LENS = (3, 9, 17)
MIN_MARGIN = 5e-3  # the brief asks > 1e-3; every fixture clears 5e-3
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
UNK, BOS, EOS, PAD, IM_START, IM_END = range(len(SPECIAL_TOKENS))  # ids follow list order
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# ---------------------------------------------------------------------------------------
# Built-in text: tokenizer training corpus and the prompts the goldens are computed on.
# ---------------------------------------------------------------------------------------

CORPUS = [
    (
        "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins "
        "with a single step. The weather today is sunny with a light breeze from the west."
    ),
    (
        "Language models predict the next token given the previous ones. Attention lets every "
        "position look at every earlier position; the cache keeps keys and values around so "
        "that each new token costs one step instead of a whole pass over the sequence."
    ),
    (
        "Once upon a time, in a small village by the sea, there lived an old fisherman who "
        "told stories to the children every evening. They listened, laughed and asked for more."
    ),
    (
        "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return "
        "fibonacci(n - 1) + fibonacci(n - 2)\n\nfor i in range(10):\n    print(i, fibonacci(i))\n"
    ),
    (
        "import numpy as np\nx = np.arange(12).reshape(3, 4)\ny = x @ x.T  # matrix product\n"
        "print(y.sum(axis=0), y.dtype)\n"
    ),
    'fn main() {\n    let v: Vec<u32> = (1..=5).collect();\n    println!("{:?}", v);\n}\n',
    '{"name": "mrs", "version": "0.1.0", "layers": [1, 2, 3], "ok": true, "pi": 3.14159}',
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name LIMIT 10;",
    "héllo wörld! Ça va? Grüße aus München, señor. Ölçü, façade, naïve, coöperate.",
    "日本語のテキストも少し入れます。東京は日本の首都です。こんにちは世界。",
    "Привет, мир! Как дела? Γειά σου κόσμε. مرحبا بالعالم. שלום עולם.",
    "Emoji test 🙂 🚀 🎉 ✨ — and some symbols: ©, ®, ™, €, £, ¥, ±, ×, ÷, °, µ.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 2024 3.14 -7 1e-5 0x1F 1,000,000.",
    (
        "User: What is the capital of France?\nAssistant: The capital of France is Paris.\n"
        "User: And of Japan?\nAssistant: Tokyo is the capital of Japan."
    ),
    "Mixing tabs\tand spaces   and\nnew lines\n\n  indented text  with trailing spaces   ",
    "HTTP/1.1 200 OK\nContent-Type: application/json\nX-Request-Id: abc-123\n\n",
    (
        "The mitochondria is the powerhouse of the cell. Photosynthesis turns light, water "
        "and carbon dioxide into sugar and oxygen. Gravity keeps the planets in orbit."
    ),
]

LOGITS_TEXT = (
    "The old fisherman told the children a story about the sea, the stars and a small "
    "boat that sailed to Tokyo and back. def main(): print('héllo wörld 🙂') — 日本語 "
    "and more text so that even the long prompt has plenty of real tokens in it."
)
PROMPT_TEXT = "Once upon a time, in a small village by the sea, there lived an old man."
BERT_TEXTS = [
    "The quick brown fox.",
    "Attention lets every position look at every earlier position.",
    "Héllo wörld, the weather today is sunny with a light breeze from the west!",
]

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set offset = 1 -%}"
    "{%- else -%}{%- set offset = 0 -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('System message must come first') -}}"
    "{%- endif -%}"
    "{%- elif (message['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# ---------------------------------------------------------------------------------------
# Fixture specs
# ---------------------------------------------------------------------------------------

SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": None,
}


@dataclass(frozen=True)
class Spec:
    """One decoder fixture: which transformers classes, which config, how to save it."""

    description: str
    config_cls: str  # transformers class names, resolved lazily
    model_cls: str
    config: dict[str, Any]
    seed: int = 0
    matrix_std: float = 0.15  # std of every weight matrix (transformers default: 0.02)
    embed_std: float = 0.1  # std of the input embeddings
    head_std: float = 1.0  # std of lm_head: logits std is about sqrt(hidden) * head_std
    hub_config: Callable[[dict], dict] | None = None  # rewrite config.json after saving
    max_shard_size: str | None = None
    eos_list: bool = False  # generation_config eos_token_id as a list
    logits_len: int = 24
    long_logits_len: int | None = None  # extra long_logits_ids / long_logits golden


def v4_rope(scaling: dict | None = None, old_type_key: bool = False):
    """Return a config.json rewrite into the transformers 4.x dialect Hub files use.

    transformers 5 writes `rope_parameters: {rope_type, rope_theta, ...}`; 4.x checkpoints
    carry top-level `rope_theta` (and `partial_rotary_factor`) plus an optional
    `rope_scaling` dict. `scaling` replaces the scaling dict verbatim (e.g. the old
    `{"type": "linear"}` spelling); otherwise it is derived from `rope_parameters`,
    with `rope_type` spelled `type` when old_type_key (as Phi-3/Phi-4-mini ship it).
    """

    def rewrite(cfg: dict) -> dict:
        rp = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rp.pop("rope_theta")
        if "partial_rotary_factor" in rp:
            cfg["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
        if "original_max_position_embeddings" in rp and "original_max_position_embeddings" in cfg:
            rp.pop("original_max_position_embeddings")  # Phi3 keeps it top-level
        if scaling is not None:
            cfg["rope_scaling"] = scaling
        elif rp.get("rope_type", "default") != "default":
            if old_type_key:
                rp["type"] = rp.pop("rope_type")
            cfg["rope_scaling"] = rp
        return dict(sorted(cfg.items()))

    return rewrite


LLAMA = dict(SMALL, num_key_value_heads=2)
# Phi3 longrope: head_dim 16 * partial 0.75 = 12 rotary dims -> 6 factors per list.
PHI3_SHORT = [1.0, 1.05, 1.1, 1.25, 1.5, 2.0]
PHI3_LONG = [1.0, 1.5, 2.5, 4.0, 6.0, 8.0]

SPECS: dict[str, Spec] = {
    "llama": Spec(
        "Llama, tied embeddings, GQA 4q/2kv, default rope, config as transformers 5 writes it "
        "(rope_parameters); generation_config eos_token_id is a list",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(LLAMA, tie_word_embeddings=True),
        seed=1,
        eos_list=True,
    ),
    "llama3": Spec(
        "Llama 3 rope scaling (factor 8, original 64), head_dim 32 override, attention and "
        "MLP biases, untied; config.json in the 4.x dialect (rope_theta + rope_scaling)",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            LLAMA,
            head_dim=32,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        hub_config=v4_rope(),
    ),
    "llama-linear": Spec(
        "Llama with linear rope scaling factor 2, config in the old 4.x spelling "
        'rope_scaling: {"type": "linear", "factor": 2.0}',
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(LLAMA, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        hub_config=v4_rope(scaling={"type": "linear", "factor": 2.0}),
    ),
    "llama-dynamic": Spec(
        "Llama with dynamic NTK rope factor 2 and max_position_embeddings 32; the logits "
        "prompt (48 tokens) and every greedy run go past 32",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            LLAMA,
            max_position_embeddings=32,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        ),
        logits_len=48,
    ),
    "mistral": Spec(
        "Mistral, GQA 4q/2kv, sliding_window 16 (generations are longer than the window)",
        "MistralConfig",
        "MistralForCausalLM",
        dict(LLAMA, sliding_window=16),
    ),
    "granite": Spec(
        "Granite: embedding_multiplier 4, residual_multiplier 0.5, attention_multiplier 0.2, "
        "logits_scaling 3",
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(
            LLAMA,
            embedding_multiplier=4.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=3.0,
        ),
        seed=3,
        head_std=2.0,  # logits are divided by 3; keep them peaky anyway
    ),
    "qwen2": Spec(
        "Qwen2: q/k/v biases, tied embeddings, GQA 4q/2kv",
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(LLAMA, tie_word_embeddings=True),
        seed=2,
    ),
    "qwen3": Spec(
        "Qwen3: per-head q_norm/k_norm, explicit head_dim 16, GQA 4q/2kv",
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(LLAMA, head_dim=16, tie_word_embeddings=False),
    ),
    "llama-sharded": Spec(
        "Same architecture as llama but untied, saved in several safetensors shards with "
        "model.safetensors.index.json",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(LLAMA, tie_word_embeddings=False),
        max_shard_size="200KB",
    ),
    "phi": Spec(
        "Phi-2 style: parallel attention/MLP block, LayerNorm, partial_rotary_factor 0.5, "
        "gelu_new, biases everywhere (lm_head too), no qk_layernorm",
        "PhiConfig",
        "PhiForCausalLM",
        dict(
            SMALL,
            partial_rotary_factor=0.5,
            hidden_act="gelu_new",
            qk_layernorm=False,
            tie_word_embeddings=False,
        ),
    ),
    "phi3": Spec(
        "Phi-3/Phi-4-mini style: fused qkv/gate_up, longrope (distinct short/long factors, "
        "original 32, max 128), partial_rotary_factor 0.75; config.json in the 4.x dialect "
        "Phi-4-mini ships (rope_scaling {type: longrope, ...}, top-level partial_rotary_factor, "
        "rope_theta and original_max_position_embeddings)",
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            LLAMA,
            pad_token_id=PAD,
            tie_word_embeddings=False,
            max_position_embeddings=128,
            original_max_position_embeddings=32,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "short_factor": PHI3_SHORT,
                "long_factor": PHI3_LONG,
            },
        ),
        seed=3,
        hub_config=v4_rope(old_type_key=True),
        long_logits_len=48,
    ),
    "gemma": Spec(
        "Gemma: embeddings x sqrt(hidden), (1 + w) RMSNorm, GeGLU, head_dim 32, tied, GQA 4q/2kv",
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(LLAMA, head_dim=32, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
        seed=0,
    ),
    "gemma2": Spec(
        "Gemma 2: sandwich norms, attention soft-cap 10 and final soft-cap 20 (both bite), "
        "query_pre_attn_scalar 24, sliding window 16 on layer 0 of 2, head_dim 16",
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(LLAMA, head_dim=16, sliding_window=16, query_pre_attn_scalar=24, attn_logit_softcapping=10.0,
             final_logit_softcapping=20.0, tie_word_embeddings=True),
        seed=7,
        embed_std=0.05,
    ),
    "gemma3": Spec(
        "Gemma 3 text: per-head q/k norms, local (window 16, rope theta 1e4) and global (linear "
        "rope factor 2, theta 1e6) layers from per-layer-type rope_parameters, 3 layers",
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(LLAMA, head_dim=16, num_hidden_layers=3, sliding_window=16, query_pre_attn_scalar=16,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
             tie_word_embeddings=True),
        seed=4,
        embed_std=0.05,
        matrix_std=0.25,
    ),
    "mamba": Spec(
        "Mamba-1: state_size 8, conv_kernel 4, expand 2, tied embeddings (slow torch path)",
        "MambaConfig",
        "MambaForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "state_size": 8,
            "conv_kernel": 4,
            "expand": 2,
            "tie_word_embeddings": True,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "pad_token_id": PAD,
        },
        seed=1,
        matrix_std=0.3,  # at 0.15 the recurrence settles and greedy repeats one token
    ),
}

FIXTURES: dict[str, str] = {name: spec.description for name, spec in SPECS.items()}
FIXTURES["bert"] = (
    "BERT encoder (BertModel) with a WordPiece tokenizer and sentence-transformers files "
    "(Transformer -> mean Pooling -> Normalize, max_seq_length 64)"
)


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------


def stamp() -> dict[str, str]:
    """What the fixtures depend on; conftest rebuilds when the stamp on disk differs."""
    return {
        "script": SCRIPT_VERSION,
        "torch": version("torch"),
        "transformers": version("transformers"),
        "tokenizers": version("tokenizers"),
    }


def is_current(out_dir: Path) -> bool:
    """Whether out_dir holds a complete build made by this script and these libraries."""
    path = Path(out_dir) / STAMP_FILE
    if not path.is_file():
        return False
    built = json.loads(path.read_text())
    try:
        return built == stamp()
    except PackageNotFoundError:    # no torch here (the torch-free CI stage): take what the full one built
        return built.get("script") == SCRIPT_VERSION


@contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on out_dir, so concurrent builders (pytest workers) queue."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def train_bpe_tokenizer():
    """A byte-level BPE tokenizer (~450 tokens) that prepends <s>, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=450,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() <= VOCAB
    return tok


def save_bpe_tokenizer(tok, folder: Path) -> None:
    tok.save(str(folder / "tokenizer.json"))
    write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": 4096,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )


def check_bpe_tokenizer(folder: Path) -> None:
    """transformers must load the tokenizer folder and render the chat template."""
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    at = AutoTokenizer.from_pretrained(folder)
    ids = at.encode("héllo wörld 日本語 🙂")
    assert (
        ids[0] == BOS
        and ids[1] != BOS
        and at.decode(ids, skip_special_tokens=True) == "héllo wörld 日本語 🙂"
    )
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
    ]
    text = at.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n"), text
    assert text.endswith("<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n"), text
    try:
        at.apply_chat_template(msgs[1:2] * 2, tokenize=False)
    except TemplateError as e:  # what raise_exception() raises
        assert "alternate" in str(e), e
    else:
        raise AssertionError("chat template accepted two user turns in a row")


def encode(tok, text: str, n: int):
    """The first n ids of `text` encoded with BOS, as a [1, n] int64 torch tensor."""
    import torch

    ids = tok.encode(text).ids
    assert len(ids) >= n, f"text too short: {len(ids)} < {n} tokens"
    return torch.tensor([ids[:n]], dtype=torch.long)


def peaky_(
    model, matrix_std: float, embed_std: float, head_std: float, vector_std: float = 0.1
) -> None:
    """Redraw weights so logits have clear winners; perturb every vector parameter.

    Matrices (and conv kernels) ~ N(0, matrix_std); input embeddings ~ N(0, embed_std);
    an untied lm_head ~ N(0, head_std). With tied embeddings the final norm's weight is
    scaled by head_std / embed_std instead: large tied embeddings make the residual
    stream point at the input token, and greedy decoding then repeats it forever.
    Vectors (norm weights, biases, Mamba A_log/D/dt bias) get N(0, vector_std) noise,
    so a forgotten bias or norm weight shows up as a mismatch.
    """
    import torch

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head = None if head is None else head.weight
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            if p is emb:
                p.normal_(0.0, embed_std)
            elif p is head:
                p.normal_(0.0, head_std)
            elif p.ndim >= 2 and name.endswith("weight"):
                p.normal_(0.0, matrix_std)
            else:
                p.add_(torch.randn_like(p) * vector_std)
        if head is emb:
            final_norm = [
                m for n, m in model.named_modules() if "norm" in type(m).__name__.lower()
            ][-1]
            final_norm.weight.mul_(head_std / embed_std)


def fresh(model):
    """A copy with pristine rotary state: dynamic/longrope rope caches mutate per call."""
    return copy.deepcopy(model)


def greedy(model, prompt, steps: int = GREEDY_STEPS):
    """Greedy tokens for one prompt with the HF cache, one token per step, no EOS stop.

    Returns (tokens [steps] int32, smallest top-1/top-2 logit margin).
    """
    import torch

    model = fresh(model)
    tokens, margin = [], float("inf")
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        for step in range(steps):
            logits = out.logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            margin = min(margin, float(top2[0] - top2[1]))
            tokens.append(int(logits.argmax()))
            if step + 1 < steps:
                nxt = torch.tensor([[tokens[-1]]], dtype=torch.long)
                out = model(input_ids=nxt, use_cache=True, cache=out.cache)
    return np.asarray(tokens, dtype=np.int32), margin


def full_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return fresh(model)(input_ids=ids, use_cache=False).logits.float().numpy()


@contextmanager
def staging(out_dir: Path, name: str) -> Iterator[Path]:
    """A scratch folder that replaces out_dir/name only if the block completes."""
    tmp = out_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = out_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------


def build_decoder(name: str, spec: Spec, tok, folder: Path) -> None:
    """Make a peaky random model, save it as a Hub folder, reload it, record goldens."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    config = getattr(transformers, spec.config_cls)(**spec.config)
    model = getattr(transformers, spec.model_cls)._from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    peaky_(model, spec.matrix_std, spec.embed_std, spec.head_std)
    model.eval()

    save_kw = {"max_shard_size": spec.max_shard_size} if spec.max_shard_size else {}
    model.save_pretrained(folder, **save_kw)
    GenerationConfig(
        bos_token_id=BOS,
        eos_token_id=[IM_END, EOS] if spec.eos_list else EOS,
        pad_token_id=spec.config.get("pad_token_id"),
    ).save_pretrained(folder)
    if spec.hub_config is not None:
        cfg_path = folder / "config.json"
        write_json(cfg_path, spec.hub_config(json.loads(cfg_path.read_text())))
    save_bpe_tokenizer(tok, folder)

    # Goldens come from the folder as saved, so they describe exactly what mrs will load;
    # the in-memory model must agree (this is what checks the 4.x config rewrites).
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert type(loaded).__name__ == spec.model_cls, type(loaded)

    golden: dict[str, np.ndarray] = {}
    lengths = {"": spec.logits_len, "long_": spec.long_logits_len}
    for prefix, n in lengths.items():
        if n is None:
            continue
        ids = encode(tok, LOGITS_TEXT, n)
        golden[f"{prefix}logits_ids"] = ids.numpy().astype(np.int32)
        golden[f"{prefix}logits"] = full_logits(loaded, ids)
        err = float(np.abs(full_logits(model, ids) - golden[f"{prefix}logits"]).max())
        assert err < 1e-5, f"{name}: the saved folder changes {prefix}logits by {err:.2e}"

    margins, distinct, consistent = [], [], True
    for i, n in enumerate(PROMPT_LENS):
        prompt = encode(tok, PROMPT_TEXT, n)
        tokens, margin = greedy(loaded, prompt)
        assert margin > MIN_MARGIN, (
            f"{name}: greedy prompt {i} has a top-1/top-2 margin of {margin:.2e} "
            f"<= {MIN_MARGIN}; pick another seed for this fixture"
        )
        assert len(set(tokens.tolist())) >= 8, f"{name}: greedy prompt {i} is degenerate: {tokens}"
        golden[f"prompt_{i}"] = prompt.numpy().astype(np.int32)
        golden[f"greedy_{i}"] = tokens
        margins.append(margin)
        distinct.append(len(set(tokens.tolist())))
        # For the log: does one uncached forward over prompt + output pick the same tokens?
        # (Not for dynamic/longrope rope: their frequencies depend on each call's length.)
        seq = torch.cat([prompt, torch.from_numpy(tokens[:-1]).long()[None]], dim=1)
        consistent &= bool((full_logits(loaded, seq)[0, n - 1 :].argmax(-1) == tokens).all())
    golden["margin_min"] = np.float32(min(margins))
    np.savez(folder / "golden.npz", **golden)
    log.info(
        "%-14s %4.1fs  margin_min %.3f  distinct greedy tokens %s  cached == uncached: %s",
        name,
        time.perf_counter() - t0,
        min(margins),
        distinct,
        consistent,
    )


def train_wordpiece_tokenizer():
    """A lower-casing BERT WordPiece tokenizer that wraps text in [CLS] ... [SEP]."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=BERT_SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4 + BERT_TEXTS, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    assert tok.get_vocab_size() <= VOCAB
    return tok


def save_sentence_transformers_files(folder: Path, dim: int) -> None:
    """modules.json etc.: Transformer -> mean Pooling -> Normalize, as all-MiniLM ships."""
    write_json(
        folder / "modules.json",
        [
            {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
            for i, (path, kind) in enumerate(
                [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
            )
        ],
    )
    (folder / "1_Pooling").mkdir()
    modes = ["cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
             "weightedmean_tokens", "lasttoken"]  # fmt: skip
    pooling = {f"pooling_mode_{m}": m == "mean_tokens" for m in modes}
    write_json(
        folder / "1_Pooling" / "config.json",
        {"word_embedding_dimension": dim, **pooling, "include_prompt": True},
    )
    (folder / "2_Normalize").mkdir()
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": 64, "do_lower_case": False})


def build_bert(folder: Path, seed: int = 0) -> None:
    """BERT encoder + WordPiece tokenizer + sentence-transformers files + goldens."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    t0 = time.perf_counter()
    tok = train_wordpiece_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": True,
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
            "model_max_length": 128,
            "clean_up_tokenization_spaces": True,
        },
    )

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        type_vocab_size=2,
        pad_token_id=tok.token_to_id("[PAD]"),
    )
    model = BertModel._from_config(config, attn_implementation="eager", dtype=torch.float32)
    peaky_(model, matrix_std=0.15, embed_std=0.5, head_std=0.5)
    model.eval().save_pretrained(folder)
    save_sentence_transformers_files(folder, config.hidden_size)
    write_json(folder / "texts.json", BERT_TEXTS)

    batch = AutoTokenizer.from_pretrained(folder)(BERT_TEXTS, padding=True, return_tensors="pt")
    for row, text in zip(batch["input_ids"].tolist(), BERT_TEXTS):
        ids = tok.encode(text).ids
        assert row[: len(ids)] == ids, (row, ids)  # transformers tokenizes as tokenizer.json does
    loaded = AutoModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        hidden = loaded.eval()(**batch).last_hidden_state
        assert torch.allclose(hidden, model(**batch).last_hidden_state, atol=1e-5)
    mask = batch["attention_mask"][..., None].float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    np.savez(
        folder / "golden.npz",
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=batch["attention_mask"].numpy().astype(np.int32),
        last_hidden_state=hidden.numpy().astype(np.float32),
        embeddings=emb.numpy().astype(np.float32),
    )
    lengths = batch["attention_mask"].sum(1).tolist()
    log.info("%-14s %4.1fs  token counts %s", "bert", time.perf_counter() - t0, lengths)


def build_all(out_dir: Path = DEFAULT_OUT, only: list[str] | None = None) -> dict[str, Path]:
    """Build the named fixtures (all by default) under out_dir; return name -> folder.

    Each fixture is built in a scratch folder and renamed into place when complete.
    The stamp is written only after a full build, so a partial build never passes
    for a complete one.
    """
    import torch
    from transformers.utils import logging as hf_logging

    unknown = set(only or []) - set(FIXTURES)
    if unknown:
        raise ValueError(f"unknown fixture(s) {sorted(unknown)}; known: {sorted(FIXTURES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP_FILE).unlink(missing_ok=True)

    verbosity, threads = hf_logging.get_verbosity(), torch.get_num_threads()
    hf_logging.set_verbosity_error()  # kernel-fallback notices, deprecations
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (conv1d: ~50x)
    try:
        built: dict[str, Path] = {}
        tok = None
        for name in FIXTURES:
            if only is not None and name not in only:
                continue
            with staging(out_dir, name) as folder:
                if name == "bert":
                    build_bert(folder)
                else:
                    if tok is None:
                        tok = train_bpe_tokenizer()
                    build_decoder(name, SPECS[name], tok, folder)
                    if len(built) == 0:
                        check_bpe_tokenizer(folder)
            built[name] = out_dir / name
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
        torch.set_num_threads(threads)
    if only is None:
        write_json(out_dir / STAMP_FILE, stamp())
    return built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)"
    )
    ap.add_argument(
        "--only", nargs="+", metavar="NAME", choices=sorted(FIXTURES), help="build only these"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    t0 = time.perf_counter()
    with locked(args.out):
        built = build_all(args.out, args.only)
    log.info("built %d fixtures in %s in %.1fs", len(built), args.out, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
