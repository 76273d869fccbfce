"""A GGUF file's tokenizer metadata -> a ``tokenizers.Tokenizer`` that encodes as llama.cpp does.

``tokenizer.ggml.model`` says which kind:

- ``llama``: SentencePiece-style BPE over "▁"-spelled pieces with byte fallback
  (``<0x41>``). The file has no merges: they are rebuilt from the vocabulary, every
  split of a piece into two pieces of the vocabulary, best first by the merged piece's
  score. Gemma's files are read with two differences (as llama.cpp and transformers
  read them): runs of spaces are stored as real spaces and respelled "▁", and merge
  priority follows the order of the pieces in the file, not their scores; spaces are
  replaced rather than prefixed.
- ``gpt2``: byte-level BPE with the file's merges, the text split first by the regex of
  ``tokenizer.ggml.pre`` (the one llama.cpp picks for that name).

Control tokens (type 3) become special tokens, user-defined ones (type 4) added
tokens, so neither is cut into pieces; unused ones (type 5) are special too, so they
print nothing. BOS/EOS are added as ``add_bos_token`` / ``add_eos_token`` say.
"""

from __future__ import annotations

from typing import Any

from mrs.errors import TokenizerError

CONTROL, USER_DEFINED, UNUSED = 3, 4, 5
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the split regex llama.cpp applies before byte-level BPE
SPLITS = {"llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3,
          "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}


def rebuilt_merges(tokens: list[str], priority: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) split of a piece into two vocabulary pieces, best merged piece
    first (higher priority), ties broken by shorter left, then shorter right, then the
    pieces' ids -- the order llama.cpp's SentencePiece merge loop effectively follows."""
    ids = {token: i for i, token in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, priority):
        local = []
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                local.append((ids[left], ids[right], left, right, score))
        local.sort()
        found.extend(local)
    found.sort(key=lambda m: (m[4], len(m[2]), len(m[3])), reverse=True)   # stable: id order within ties
    return [(m[2], m[3]) for m in found]


def build(arch: str, meta: dict[str, Any]) -> Any:
    """The tokenizers.Tokenizer for this metadata (``meta``: the ``tokenizer.*`` fields)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError("the GGUF file has no tokenizer.ggml.tokens")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if kind == "llama":
        gemma = arch in GEMMA_ARCHS
        if gemma:
            tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
            priority = [-float(i) for i in range(len(tokens))]
        else:
            priority = [float(s) for s in meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)]
        vocab = {t: i for i, t in enumerate(tokens)}
        unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
        tok = Tokenizer(BPE(vocab=vocab, merges=rebuilt_merges(tokens, priority), unk_token=unk, fuse_unk=True,
                            byte_fallback=True))
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if gemma:
            tok.normalizer = normalizers.Replace(" ", "\u2581")
            tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        else:
            prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                         prepend_scheme="first" if prefix else "never", split=False)
            if prefix:
                steps.append(decoders.Strip(content=" ", left=1))
        tok.decoder = decoders.Sequence(steps)
    elif kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        tok = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        split = SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split is not None:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (supported: llama, gpt2)")
    # Unused entries (a vocabulary padded past the tokenizer, "[PAD504]") print nothing, as in llama.cpp.
    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (CONTROL, UNUSED)]
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    single, pair, special = "$A", "$A $B", []
    if add_bos and isinstance(bos, int):
        single, pair = f"{tokens[bos]} {single}", f"{tokens[bos]} $A {tokens[bos]} $B"
        special.append((tokens[bos], bos))
    if add_eos and isinstance(eos, int):
        single, pair = f"{single} {tokens[eos]}", f"{pair} {tokens[eos]}"
        special.append((tokens[eos], eos))
    if special:
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(
            dict(special).items()))
    return tok
