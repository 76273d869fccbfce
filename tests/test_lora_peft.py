"""LoRA held to Hugging Face PEFT on transformers, on the same fixture weights: a
PEFT-made adapter (random, non-zero B) runs in mrs as in PEFT, its gradients equal torch
autograd's, an adapter trained by mrs loads in PEFT, and `mrs merge` equals the adapter
applied."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

import mrs  # noqa: E402
from mrs import adapters  # noqa: E402
from mrs.cli import main  # noqa: E402
from mrs.train import LoraModel  # noqa: E402

TOLERANCE = 1e-4
IDS = np.array([[1, 5, 7, 9, 11, 13, 40, 41, 100, 3, 77, 12]], np.int32)

# (fixture, PEFT target_modules, rsLoRA): fused q/k/v and gate/up adapted in part (llama,
# qwen3, gemma3), Phi-3's checkpoint-fused qkv_proj and gate_up_proj whole, Phi-2's
# separate projections with biases, and Mamba's in/x projections.
CASES = [("llama", ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], False),
         ("qwen3", ["q_proj", "k_proj", "up_proj"], True),
         ("gemma3", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
         ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], False),
         ("phi", ["q_proj", "dense", "fc1", "fc2"], False),
         ("mamba", ["in_proj", "x_proj"], False)]


def peft_model(path, targets, rslora, seed=0):
    """transformers' model with PEFT's LoRA, A and B both random (init_lora_weights=False)."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False,
                             lora_dropout=0.0, use_rslora=rslora)
    return peft.get_peft_model(base, config)


def next_token_loss(model, ids):
    logits = model(torch.tensor(ids, dtype=torch.long)).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[0, 1:], dtype=torch.long))
    return logits, loss


def batch(ids):
    width = ids.shape[1] - 1
    return {"tokens": ids[:, :-1], "positions": np.arange(width, dtype=np.int32)[None], "targets": ids[:, 1:],
            "weights": np.ones((1, width), np.float32)}


@pytest.mark.parametrize("name,targets,rslora", CASES, ids=[c[0] for c in CASES])
def test_a_peft_adapter_gives_peft_logits_and_torch_gradients(fixture_path, tmp_path, name, targets, rslora):
    path = fixture_path(name)
    theirs = peft_model(path, targets, rslora)
    theirs.save_pretrained(tmp_path)
    logits, loss = next_token_loss(theirs, IDS)
    loss.backward()
    adapter = adapters.read(tmp_path)
    assert adapter.settings.rslora is rslora and adapter.settings.scale == (12 / 2 if rslora else 3.0)

    lora = LoraModel(mrs.load(str(path)), adapter.settings)
    params = lora.load_adapter(adapter)
    ours = lora.logits(params, lora.frozen, IDS, np.arange(IDS.shape[1], dtype=np.int32)[None], lora.empty_cache(1))
    expected = logits.detach().numpy()
    assert np.abs(expected - np.asarray(lora.logits(lora.params, lora.frozen, IDS,
                                                    np.arange(IDS.shape[1], dtype=np.int32)[None],
                                                    lora.empty_cache(1)))).max() > 1e-2   # the adapter matters
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOLERANCE, rtol=0)
    merged = mrs.load(str(path), adapter=tmp_path)           # folded into the weights at load
    np.testing.assert_allclose(merged.logits(IDS), expected, atol=TOLERANCE, rtol=0)

    grads = jax.grad(lambda p: lora.loss(p, lora.frozen, batch(IDS), lora.empty_cache(1))[0])(params)
    ours_grads = lora.adapter(grads).weights                  # in the checkpoint's layout, as PEFT keeps them
    compared = 0
    for module_name, module in theirs.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = module_name.removeprefix("base_model.model.")
            grad_a, grad_b = ours_grads[key]
            np.testing.assert_allclose(grad_a, module.lora_A["default"].weight.grad.numpy(), atol=TOLERANCE, rtol=0)
            np.testing.assert_allclose(grad_b, module.lora_B["default"].weight.grad.numpy(), atol=TOLERANCE, rtol=0)
            compared += 1
    assert compared == len(adapter.weights) == len(ours_grads) > 0


@pytest.fixture(scope="module")
def trained(fixture_path, tmp_path_factory):
    """An adapter mrs trained on the llama fixture (a few updates, so B is far from zero)."""
    folder = tmp_path_factory.mktemp("trained")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"count {i}", "completion": f" {i} {i + 1} {i + 2}"}) + "\n"
                            for i in range(8)))
    model = mrs.load(str(fixture_path("llama")))
    result = mrs.train.lora(model, data, out=folder / "adapter", steps=6, learning_rate=1e-2, batch_size=4, rank=4,
                            alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    return result, folder / "adapter"


def test_an_adapter_trained_by_mrs_loads_in_peft_with_mrs_logits(fixture_path, trained):
    result, folder = trained
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert min(np.abs(b).max() for _, b in adapters.read(folder).weights.values()) > 1e-3   # trained, not zero
    base = transformers.AutoModelForCausalLM.from_pretrained(fixture_path("llama"), dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, folder)
    expected = theirs(torch.tensor(IDS, dtype=torch.long)).logits.detach().numpy()
    lora = result.lora
    ours = lora.logits(result.trainer.params, lora.frozen, IDS, np.arange(IDS.shape[1], dtype=np.int32)[None],
                       lora.empty_cache(1))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(mrs.load(str(fixture_path("llama")), adapter=folder).logits(IDS), expected,
                               atol=TOLERANCE, rtol=0)


def test_merge_writes_a_plain_model_equal_to_the_adapter_applied(fixture_path, trained, tmp_path, capsys):
    _, folder = trained
    out = tmp_path / "merged"
    assert main(["merge", str(fixture_path("llama")), str(folder), "--out", str(out)]) == 0
    assert "merged the adapter into 12 modules" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in fixture_path("llama").iterdir() if not p.name.startswith("."))
    adapted = mrs.load(str(fixture_path("llama")), adapter=folder).logits(IDS)
    np.testing.assert_allclose(mrs.load(str(out)).logits(IDS), adapted, atol=1e-6, rtol=0)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_allclose(plain(torch.tensor(IDS, dtype=torch.long)).logits.detach().numpy(), adapted,
                               atol=TOLERANCE, rtol=0)
    assert main(["merge", str(fixture_path("llama")), str(folder), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
