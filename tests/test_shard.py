"""Tensor parallelism (mrs/shard.py, mrs/backends/jax/layout.py).

The plan's arithmetic is checked here; the split models run in child processes with 8
simulated CPU devices (tests/shard_child.py), each against the same model on one device:
logits, greedy and seeded tokens, the continuous batcher, no recompiles, every matrix
really split over the devices, and the collectives of the compiled decode and prefill steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mrs
from mrs import shard
from mrs.errors import InvalidParameterError, MrsError
from mrs.families.llama import LlamaConfig
from mrs.families.mamba import MambaConfig

CHILD = Path(__file__).with_name("shard_child.py")
# Split and unsplit float32 logits differ only by the order of the partial sums' additions.
LOGITS_BOUND = 1e-5         # of the logits' largest magnitude


def llama_config(heads: int, kv_heads: int) -> LlamaConfig:
    return LlamaConfig.from_hf({"model_type": "llama", "vocab_size": 512, "hidden_size": 16 * heads,
                                "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": heads,
                                "num_key_value_heads": kv_heads})


# --- the plan ------------------------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads, devices, repeat", [
    (4, 2, 2, 1), (4, 4, 4, 1), (4, 2, 4, 2), (4, 1, 2, 2), (4, 1, 4, 4), (8, 2, 8, 4), (32, 8, 4, 1),
])
def test_kv_heads_repeat_only_where_fewer_than_the_devices(heads, kv_heads, devices, repeat):
    plan = shard.plan(llama_config(heads, kv_heads), devices)
    assert plan == shard.Plan(devices, repeat)
    running = shard.running_config(llama_config(heads, kv_heads), plan)
    assert running.num_key_value_heads == kv_heads * repeat
    assert running.num_key_value_heads % devices == 0


@pytest.mark.parametrize("heads, kv_heads, devices, says", [
    (4, 2, 3, "divisor of the model's 4 query heads"),
    (4, 2, 8, "divisor of the model's 4 query heads"),
    (12, 3, 2, "a divisor or a multiple of the model's 3 kv heads"),
    (12, 6, 4, "a divisor or a multiple of the model's 6 kv heads"),
])
def test_splits_that_do_not_divide_are_refused_with_the_reason(heads, kv_heads, devices, says):
    with pytest.raises(InvalidParameterError, match=says):
        shard.plan(llama_config(heads, kv_heads), devices)


@pytest.mark.parametrize("devices", [0, -2, True, 2.0, "2", None])
def test_a_device_count_must_be_a_positive_whole_number(devices):
    with pytest.raises(InvalidParameterError, match="whole number of devices"):
        shard.plan(llama_config(4, 2), devices)


def test_mamba_splits_its_inner_channels():
    config = MambaConfig.from_hf({"model_type": "mamba", "vocab_size": 512, "hidden_size": 48,
                                  "expand": 2, "state_size": 8, "num_hidden_layers": 1})
    assert shard.plan(config, 4) == shard.Plan(4)
    with pytest.raises(InvalidParameterError, match="96 inner channels"):
        shard.plan(config, 5)


def test_a_dimension_splits_by_the_first_rule_that_divides_it():
    plan = shard.Plan(4)
    assert plan.spec(("kv_heads", "qkv", "head_dim", "embed"), (4, 4, 16, 64)) == ("model", None, None, None)
    assert plan.spec(("embed", "heads"), (64, 64)) == (None, "model")
    assert plan.spec(("gate_up", "mlp", "embed"), (2, 128, 64)) == (None, "model", None)
    assert plan.spec(("vocab", "embed"), (510, 64)) == (None, None)       # 510 rows do not split 4 ways
    assert plan.spec(("embed",), (64,)) == (None,)
    assert shard.Plan(1).spec(("vocab", "embed"), (512, 64)) == (None, None)


@pytest.mark.parametrize("kv, group, repeat", [(1, 4, 2), (1, 4, 4), (2, 4, 2), (3, 6, 3), (2, 2, 2)])
def test_repeated_kv_heads_serve_the_same_query_heads(kv, group, repeat):
    """Label every row of a fused [K, G + 2, H] projection by what it is; after repeating,
    the query heads keep their order (n = new_group * per + j), and each new group's k and
    v rows are those of the original group its query heads came from (n // G)."""
    fused = np.zeros((kv, group + 2, 1), np.int64)
    for k in range(kv):
        fused[k, :group, 0] = [1000 + k * group + g for g in range(group)]       # query head ids
        fused[k, group, 0], fused[k, group + 1, 0] = 2000 + k, 3000 + k           # its key and value
    out = shard.repeat_kv(fused, repeat)
    per = group // repeat
    assert out.shape == (kv * repeat, per + 2, 1)
    assert shard.checkpoint_shape(out.shape, shard.Plan(kv * repeat, repeat)) == fused.shape
    queries = out[:, :per, 0].reshape(-1)
    np.testing.assert_array_equal(queries, 1000 + np.arange(kv * group))
    for new in range(kv * repeat):
        source = (new * per) // group
        assert out[new, per, 0] == 2000 + source and out[new, per + 1, 0] == 3000 + source


def test_loading_split_needs_the_devices_and_a_model_that_splits(fixture_path):
    with pytest.raises(MrsError, match="needs 2 cpu devices; this machine has 1"):
        mrs.load(str(fixture_path("llama")), tensor_parallel=2)
    with pytest.raises(InvalidParameterError, match="divisor of the model's 4 query heads"):
        mrs.load(str(fixture_path("llama")), tensor_parallel=3)
    with pytest.raises(InvalidParameterError, match="do not run tensor parallel"):
        mrs.load(str(fixture_path("bert")), tensor_parallel=2)


def test_a_backend_without_tensor_parallel_refuses_it(fixture_path, monkeypatch):
    from mrs import backends

    class OneDevice:
        NAME = "one-device"

    monkeypatch.setattr(backends, "for_device", lambda device: OneDevice)
    with pytest.raises(MrsError, match="the one-device backend runs a model on one device only"):
        mrs.load(str(fixture_path("llama")), tensor_parallel=2)


# --- split models against the unsplit ones, 8 simulated devices -----------------------

def run_child(*args: str, cache: str = "off", timeout: float = 600) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "MRS_COMPILE_CACHE": cache}
    done = subprocess.run([sys.executable, str(CHILD), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A random Llama with 8 query and 2 kv heads: the fixtures' 4 heads do not split 8 ways."""
    from conftest import load_script

    random_model = load_script("random_model")
    return random_model.make_random_model(
        "smollm2-135m", "float32", tmp_path_factory.mktemp("wide") / "llama8", layers=2,
        overrides={"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8,
                   "num_key_value_heads": 2, "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2})


CASES = {
    "llama": (["2", "4", "--batcher"], "llama"),        # 2 kv heads: 4 devices repeat them
    "phi3": (["2", "4"], "phi3"),
    "gemma3": (["2", "4"], "gemma3"),                   # sliding window, soft-capping, q/k norms
    "mamba": (["2", "4", "8"], "mamba"),
    "phi": (["2", "4"], "phi"),                         # separate q/k/v, a parallel block
    "qwen2-int8": (["2", "--quantize", "int8"], "qwen2"),   # a quantized q/k/v with a bias
}


WIDE = {
    "llama-8-heads": ["2", "8", "--batcher"],
    # The CPU kernel on each device's slice. Groups of 64: o_proj's 128 inputs are 2 groups,
    # whole on each of 4 devices; down_proj's 256 are 4 and split.
    "llama-8-heads-int8": ["2", "4", "--quantize", "int8"],
}


@pytest.mark.parametrize("case", list(CASES) + list(WIDE))
def test_a_split_model_computes_what_the_whole_one_does(case, fixture_path, request):
    if case in WIDE:
        args, path = WIDE[case], request.getfixturevalue("wide_llama")
    else:
        args, name = CASES[case]
        path = fixture_path(name)
    report = run_child(str(path), *args)
    assert report["devices"] == 8
    counts = [int(a) for a in args if a.isdigit()]
    for tp in counts:
        got = report[str(tp)]
        assert got["max_abs_diff"] <= LOGITS_BOUND * report["scale"], (tp, got["max_abs_diff"], report["scale"])
        assert got["greedy_equal"] and got["seeded_equal"], tp
        assert got["batcher_equal"], tp
        assert got["recompiled"] == 0, tp
        assert got["device_name"] == f"{tp} cpu devices (tensor parallel)"
        check_split(got, tp)


def check_split(got: dict, tp: int) -> None:
    """Every param spans the devices; every matrix is split tp ways; each block's partial sums
    are all-reduced; no weight is gathered."""
    leaves = got["leaves"]
    assert all(leaf["devices"] == tp for leaf in leaves), [x["name"] for x in leaves if x["devices"] != tp]
    matrices = [x for x in leaves if len(x["shape"]) >= 2]
    # A quantized weight splits with whole groups per device: a row-parallel one (o_proj,
    # down_proj) with fewer input groups than devices stays whole on each.
    groups = {x["name"].rsplit("[", 1)[0]: x["shape"][-1] for x in leaves if x["name"].endswith("['scales']")}
    whole = {m for m, count in groups.items() if count % tp and m.endswith(("['o_proj']", "['down_proj']"))}
    unsplit = [x["name"] for x in matrices if np.prod(x["shard"]) * tp != np.prod(x["shape"])
               and x["name"].rsplit("[", 1)[0] not in whole]
    assert not unsplit, unsplit
    weights = [x for x in matrices if not x["name"].endswith(("['scales']", "['biases']"))]
    weight_shapes = {tuple(x["shape"]) for x in weights} | {(int(np.prod(x["shape"][:-1])), x["shape"][-1])
                                                            for x in weights}
    # Row-parallel projections (split inputs) end in partial sums: one all-reduce each (XLA may
    # fuse several into one op; counted per array), and one for the vocabulary-split lookup.
    row_split = [x for x in weights if x["name"].endswith("['weight']") and x["shard"][-1] * tp == x["shape"][-1]]
    assert len(row_split) >= got["layers"], [x["name"] for x in row_split]
    for step in ("decode", "prefill"):
        hlo = got[step]
        assert hlo["reduced"] >= len(row_split) + 1, (step, hlo)
        batch, width = hlo["tokens"]
        for shape in hlo["gathered"]:   # activations only (logits, a block's input): tokens first
            assert tuple(shape) not in weight_shapes, (step, shape)
            assert shape[0] in (batch, batch * width), (step, shape, hlo["tokens"])


def test_a_split_model_loads_its_compiled_steps_from_the_cache(fixture_path, tmp_path):
    """Executables for a mesh are stored and loaded back onto the same devices (loaded onto
    all 8 by default, XLA aborts the process), alongside the same model unsplit."""
    script = ("import sys, json, mrs; from mrs.backends.jax import executables; "
              "a = mrs.load(sys.argv[1], tensor_parallel=2); b = mrs.load(sys.argv[1]); "
              "print('REPORT ' + json.dumps({'texts': [mrs.generate(m, 'hello world', max_tokens=8, temperature=0)"
              ".text for m in (a, b)], 'stats': dict(executables.STATS)}))")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "MRS_COMPILE_CACHE": str(tmp_path / "cache")}
    reports = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script, str(fixture_path("llama"))], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        reports.append(json.loads(done.stdout.split("REPORT ", 1)[1]))
    first, second = reports
    assert first["stats"].get("stored") == 4 and first["stats"].get("hit", 0) == 0
    assert second["stats"] == {"hit": 4}
    assert second["texts"] == first["texts"] and first["texts"][0] == first["texts"][1]
