"""``mrs merge``: a safetensors model with a LoRA adapter folded into its weights.

The result is an ordinary model folder (same tensor names, dtypes and shard layout as
the base, its config and tokenizer files copied), so transformers, vLLM or mrs load it
with no adapter code. Each shard is written as it is merged (memory: one shard), under a
temporary name renamed at the end, so an interrupted merge leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mrs import adapters, families, store
from mrs.errors import NotAModelError
from mrs.quant_checkpoint import KEPT, quantization
from mrs.store import ModelExistsError
from mrs.weights import checkpoint_files, iter_tensors

OTHER_WEIGHTS = ("*.bin", "*.pth", "*.pt", "*.gguf", "*.ckpt", "*.h5", "*.msgpack", "original")


def write_merged(source: Path, adapter: adapters.Adapter, target: Path) -> int:
    """Write ``source`` + ``adapter`` into the new folder ``target``; returns the modules merged."""
    from safetensors.numpy import save_file

    source, target = Path(source), Path(target)
    if source.is_file():
        raise NotAModelError(f"{source.name} is a GGUF file: `mrs merge` writes safetensors from a safetensors "
                             "model folder (load a GGUF with --adapter to run it adapted)")
    config = store.read_json(source / "config.json")
    if quantization(config) is not None:
        raise NotAModelError(f"{source} is quantized: merge into its dense original, then `mrs quantize` the result")
    if target.exists():
        raise ModelExistsError(f"{target} already exists; remove it or pick another destination")
    family, parsed = families.resolve(config)
    rename = family.checkpoint_map(parsed).rename
    files = checkpoint_files(source)
    partial = target.with_name(f".partial-{target.name}")
    shutil.rmtree(partial, ignore_errors=True)
    # Every file but the weights: the merged safetensors replace them, and other weight formats
    # (a Llama 3 repo's original/*.pth, pickles, GGUF copies) would hold the unmerged model.
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns(*KEPT, *OTHER_WEIGHTS))
    try:
        index = source / "model.safetensors.index.json"
        if index.is_file():
            shutil.copyfile(index, partial / index.name)
        shard: dict = {}
        current = None
        for name, array in adapters.merged(iter_tensors(source), adapter, rename):
            if files[name] != current and shard:
                save_file(shard, str(partial / current.name), metadata={"format": "pt"})
                shard = {}
            current = files[name]
            shard[name] = array
        if shard:
            save_file(shard, str(partial / current.name), metadata={"format": "pt"})
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return len(adapter.weights)
