"""The Ollama API, driven by the real `ollama` client against a live server (see shared/API.md)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ollama
import pytest
from server_fixtures import (
    API_KEY,
    DETAILS,
    LLAMA,
    OLLAMA_MODEL,
    OLLAMA_SYSTEM,
    OPTION_EFFECTS,
    RAW_EMBEDDER,
    SAMPLED,
    SETTINGS,
    check_ollama_chunk,
    check_ollama_error,
    check_types,
    is_rfc3339,
    ndjson_lines,
    with_option,
)

import mrs

pytest_plugins = ["server_fixtures"]

GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def client(live_server) -> ollama.Client:
    return ollama.Client(
        host=live_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    )


def test_root_and_version_answer_like_ollama(live_server):
    import httpx

    assert httpx.get(live_server.url + "/").text == "Ollama is running"
    assert httpx.head(live_server.url + "/").status_code == 200
    with live_server.client() as c:
        assert isinstance(c.get("/api/version").json()["version"], str)


def test_generate_returns_text_stats_and_context(client):
    r = client.generate(model=LLAMA, prompt="Once upon a time", options=GREEDY)
    check_ollama_chunk(r.model_dump(exclude_none=True), chat=False)
    assert r.done and r.done_reason == "length" and r.eval_count == 12 and r.response
    assert r.prompt_eval_count > 0 and len(r.context) >= r.prompt_eval_count + r.eval_count
    again = client.generate(model=LLAMA, prompt="Once upon a time", options=GREEDY)
    assert again.response == r.response  # greedy is repeatable


def test_generate_stream_concatenates_to_the_non_stream_text(client):
    whole = client.generate(model=LLAMA, prompt="The weather today", options=GREEDY).response
    chunks = list(
        client.generate(model=LLAMA, prompt="The weather today", options=GREEDY, stream=True)
    )
    for c in chunks:
        check_ollama_chunk(c.model_dump(exclude_none=True), chat=False)
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].response == "" and "".join(c.response for c in chunks) == whole


def test_generate_stream_is_ndjson_and_missing_stream_means_streaming(live_server):
    with (
        live_server.client() as c,
        c.stream(
            "POST", "/api/generate", json={"model": LLAMA, "prompt": "Hi", "options": GREEDY}
        ) as r,
    ):
        lines = ndjson_lines(r)
    assert len(lines) > 1 and lines[-1]["done"] is True
    for line in lines:
        check_ollama_chunk(line, chat=False)


def test_format_json_and_a_schema_constrain_the_answer_as_mrs_generate_does(client, llama_here):
    from mrs.constrain import START, feed
    from mrs.schema import compile_schema, schema_feed, start_state

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for fmt, step, state in (("json", feed, START), (schema, schema_feed, start_state(compile_schema(schema)))):
        options = {"temperature": 1.0, "seed": 7}
        r = client.generate(model=LLAMA, prompt="Reply in JSON", format=fmt,
                            options={**options, "num_predict": 16})
        expected = mrs.generate(llama_here, [{"role": "user", "content": "Reply in JSON"}], format=fmt,
                                max_tokens=16, **options)
        assert r.response == expected.text and r.done_reason == expected.finish_reason
        assert r.response.lstrip().startswith("{"), r.response  # an object began within 16 tokens
        for byte in r.response.encode("utf-8"):
            state = step(state, byte)
            assert state is not None, r.response


def test_a_bad_schema_is_400(live_server):
    with live_server.client() as c:
        r = c.post("/api/generate", json={"model": LLAMA, "prompt": "x", "format": {"type": "thing"}})
    assert r.status_code == 400 and "format" in r.json()["error"]


def test_generate_with_a_stop_string_ends_before_it(client):
    text = client.generate(model=LLAMA, prompt="Once upon a time", options=GREEDY).response
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    r = client.generate(model=LLAMA, prompt="Once upon a time", options={**GREEDY, "stop": [stop]})
    assert r.done_reason == "stop" and r.response == text[: text.index(stop)]


def test_generate_context_continues_as_generating_from_the_joined_ids(client, llama_here):
    """``context`` (the prompt and answer ids of an earlier response) goes first: the new
    prompt's ids follow it — raw text without a second BOS, else the rendered user turn —
    and the answer is mrs.generate's from those joined ids, prefilling only the new ones."""
    tokenizer = llama_here.tokenizer
    first = client.generate(model=LLAMA, prompt="Hi", raw=True, options=GREEDY)
    alone = mrs.generate(llama_here, tokenizer.encode("Hi"), max_tokens=12, temperature=0)
    assert first.context == tokenizer.encode("Hi") + alone.token_ids and first.response == alone.text
    for raw, then in ((True, tokenizer.encode(" and", add_special_tokens=False)),
                      (False, tokenizer.encode_chat([{"role": "user", "content": " and"}]))):
        second = client.generate(model=LLAMA, prompt=" and", raw=raw, context=first.context, options=GREEDY)
        joined = first.context + then
        expected = mrs.generate(llama_here, joined, max_tokens=12, temperature=0)
        # Only the new ids are evaluated: the first answer's slot still holds the context.
        assert second.prompt_eval_count == len(then)
        assert second.context == joined + expected.token_ids and second.response == expected.text


@pytest.mark.parametrize("option", OPTION_EFFECTS)
def test_each_sampling_option_reaches_the_sampler(client, llama_here, option):
    """Ollama's ``options`` give the tokens mrs.generate gives with the same options and
    seed, and the option changes them: a server that dropped it would answer the others."""
    prompt = llama_here.tokenizer.encode("Once upon a time")
    expected = with_option(llama_here, prompt, option)
    r = client.generate(model=LLAMA, prompt="Once upon a time", raw=True,
                        options={**SAMPLED, **OPTION_EFFECTS[option][0], "num_predict": 16})
    assert r.context == prompt + expected.token_ids and r.response == expected.text


def test_empty_prompt_loads_the_model(client):
    r = client.generate(model=LLAMA)
    assert r.done and r.done_reason == "load" and r.response == ""


def test_chat_stream_and_not_agree_and_every_chunk_has_a_message(client):
    messages = [{"role": "system", "content": "Hm"}, {"role": "user", "content": "Hi"}]
    whole = client.chat(model=LLAMA, messages=messages, options=GREEDY)
    check_ollama_chunk(whole.model_dump(exclude_none=True), chat=True)
    assert whole.message.role == "assistant" and whole.message.content
    chunks = list(client.chat(model=LLAMA, messages=messages, options=GREEDY, stream=True))
    for c in chunks:
        check_ollama_chunk(c.model_dump(exclude_none=True), chat=True)
    assert chunks[-1].done and chunks[-1].message.content == ""
    assert "".join(c.message.content for c in chunks) == whole.message.content


def test_chat_with_seed_is_repeatable_and_seeds_differ(client):
    messages = [{"role": "user", "content": "Tell me"}]
    options = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_predict": 16}
    a = client.chat(model=LLAMA, messages=messages, options={**options, "seed": 7}).message.content
    b = client.chat(model=LLAMA, messages=messages, options={**options, "seed": 7}).message.content
    c = client.chat(model=LLAMA, messages=messages, options={**options, "seed": 8}).message.content
    assert a == b and a != c


def test_generate_logprobs_list_each_token_with_alternatives(client):
    r = client.generate(
        model=LLAMA,
        prompt="Hi",
        options={**GREEDY, "num_predict": 4},
        logprobs=True,
        top_logprobs=3,
    )
    assert len(r.logprobs) == 4
    for entry in r.logprobs:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(
            entry.logprob
        )  # greedy picks the top one


def test_list_show_and_ps_describe_the_models(client, live_server):
    listed = client.list()
    names = [m.model for m in listed.models]
    assert LLAMA in names
    raw = live_server.client().get("/api/tags").json()["models"]
    for m in raw:
        check_types(
            m,
            {
                "name": str,
                "model": str,
                "modified_at": str,
                "size": int,
                "digest": str,
                "details": dict,
            },
        )
        check_types(m["details"], DETAILS)
        assert is_rfc3339(m["modified_at"]) and len(m["digest"]) == 64
    shown = client.show(LLAMA)
    assert (
        shown.capabilities == ["completion"] and shown.modelinfo["general.architecture"] == "llama"
    )
    assert "im_start" in shown.template and shown.details.family == "llama"
    ps = client.ps()
    loaded = {m.model: m for m in ps.models}
    assert LLAMA in loaded and loaded[LLAMA].context_length == int(SETTINGS["MRS_MAX_CONTEXT"])
    raw_ps = live_server.ps()["models"]
    for m in raw_ps:
        check_types(
            m,
            {
                "name": str,
                "model": str,
                "size": int,
                "digest": str,
                "details": dict,
                "expires_at": str,
                "size_vram": int,
                "context_length": int,
            },
        )


def test_show_accepts_the_legacy_name_field_and_latest_tag(live_server):
    with live_server.client() as c:
        assert c.post("/api/show", json={"name": LLAMA + ":latest"}).status_code == 200
        r = c.post("/api/show", json={"model": "nobody/nothing"})
    assert r.status_code == 404 and "not found" in r.json()["error"]


def test_copy_then_use_then_delete_a_model(client, live_server):
    with pytest.raises(ollama.ResponseError) as e:
        client.copy("nobody/nothing", "test/x")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        client.copy(LLAMA, "../escape")
    assert e.value.status_code == 400
    assert client.copy(LLAMA, "test/llama-copy").status == "success"
    assert "test/llama-copy" in [m.model for m in client.list().models]
    original = client.generate(model=LLAMA, prompt="Hi", options=GREEDY).response
    assert (
        client.generate(model="test/llama-copy", prompt="Hi", options=GREEDY).response == original
    )
    assert client.delete("test/llama-copy").status == "success"
    assert "test/llama-copy" not in [m.model for m in client.list().models]
    assert "test/llama-copy" not in [m.model for m in client.ps().models]
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("test/llama-copy")
    assert e.value.status_code == 404
    assert not (live_server.home / "test--llama-copy").exists()


def test_keep_alive_zero_unloads_and_a_duration_expires(client, live_server):
    client.copy(LLAMA, "test/keepalive")
    try:
        client.generate(model="test/keepalive", prompt="Hi", options=GREEDY, keep_alive=0)
        assert "test/keepalive" not in [m.model for m in client.ps().models]
        # A long duration shows in /api/ps (a short one may lapse before ps asks, on a slow machine).
        client.generate(model="test/keepalive", prompt="Hi", options=GREEDY, keep_alive="1m")
        entry = next(m for m in client.ps().models if m.model == "test/keepalive")
        assert 30 < entry.expires_at.timestamp() - time.time() <= 61
        client.generate(model="test/keepalive", prompt="Hi", options=GREEDY, keep_alive="1s")
        deadline = time.monotonic() + 20
        while "test/keepalive" in [m.model for m in client.ps().models]:
            assert time.monotonic() < deadline, "keep_alive 1s never unloaded the model"
            time.sleep(0.2)
        client.generate(model="test/keepalive", prompt="", keep_alive=-1)
        entry = next(m for m in client.ps().models if m.model == "test/keepalive")
        assert entry.expires_at.year > 2100
    finally:
        client.delete("test/keepalive")


def test_least_recently_used_model_is_evicted_past_the_limit(client):
    names = ["test/lru-a", "test/lru-b", "test/lru-c"]
    for n in names:
        client.copy(LLAMA, n)
    try:
        client.generate(model=LLAMA, prompt="Hi", options=GREEDY)
        for n in names:  # 3 models at most: each new one pushes out the least recently used
            client.generate(model=n, prompt="Hi", options=GREEDY)
        loaded = [m.model for m in client.ps().models]
        assert len(loaded) <= 3 and "test/lru-c" in loaded and LLAMA not in loaded
        assert client.generate(
            model=LLAMA, prompt="Hi", options=GREEDY
        ).response  # loads again on use
        assert LLAMA in [m.model for m in client.ps().models]
    finally:
        for n in names:
            client.delete(n)


def test_pull_streams_progress_and_installs_the_model(client):
    events = list(client.pull("acme/tiny", stream=True))
    assert events[0].status == "pulling manifest" and events[-1].status == "success"
    sized = [e for e in events if e.total]
    assert sized and all(0 <= (e.completed or 0) <= e.total for e in sized)
    assert "acme/tiny" in [m.model for m in client.list().models]
    assert client.generate(model="acme/tiny", prompt="Hi", options=GREEDY, keep_alive=0).response
    client.delete("acme/tiny")


def test_pull_of_an_hf_co_quant_fetches_that_gguf_and_it_runs_by_the_same_name(client, live_server, tmp_path):
    """Ollama's ``hf.co/org/repo:QUANT``: one file of a GGUF repo, served as that name."""
    from gguf_fixtures import write_gguf

    llama = live_server.home / "test--llama"
    files = {f"tiny-{q}.gguf": write_gguf(llama, tmp_path / f"tiny-{q}.gguf", "llama", q).read_bytes()
             for q in ("F32", "Q8_0")}
    live_server.hub.add("acme/tiny-GGUF", files)
    name = "hf.co/acme/tiny-GGUF:Q8_0"
    assert client.pull(name).status == "success"
    assert "acme/tiny-GGUF:Q8_0" in [m.model for m in client.list().models]
    assert [p.name for p in (live_server.home / "acme--tiny-GGUF--Q8_0").iterdir()
            if not p.name.startswith(".")] == ["tiny-Q8_0.gguf"]
    ask = {"prompt": "Once upon a time", "raw": True, "options": {**GREEDY, "num_predict": 6}}
    assert client.generate(model=name, **ask).response == client.generate(model="acme/tiny-GGUF:Q8_0", **ask).response
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("hf.co/acme/tiny-GGUF:Q4_K_M")
    assert e.value.status_code == 404 and "F32, Q8_0" in str(e.value)
    client.generate(model=name, prompt="", keep_alive=0)
    client.delete("acme/tiny-GGUF:Q8_0")


def test_a_pull_stops_when_its_client_leaves_and_the_next_pull_resumes(client, live_server):
    from filelock import FileLock

    live_server.hub.add_folder("acme/slow", live_server.home / "test--llama")
    live_server.hub.faults["model.safetensors"] = ["slow"]
    with live_server.client() as c, c.stream("POST", "/api/pull", json={"model": "acme/slow"}) as r:
        for line in r.iter_lines():
            if '"pulling model.safetensors"' in line:
                break                                           # leave mid-download
    # A pull holds this lock (mrs.hub.pull) from its manifest to its install: once this test
    # gets it, the server's pull has ended, stopped or done.
    with FileLock(str(live_server.home / ".acme--slow.lock"), timeout=60):
        assert not (live_server.home / "acme--slow").exists()   # stopped: never installed
        assert (live_server.home / ".partial-acme--slow").is_dir()
    assert client.pull("acme/slow").status == "success"
    assert "acme/slow" in [m.model for m in client.list().models]
    client.delete("acme/slow")


def test_pull_of_a_missing_repo_is_404_and_a_bad_name_400(client, live_server):
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("acme/missing")
    assert e.value.status_code == 404
    with live_server.client() as c:
        r = c.post("/api/pull", json={"model": "../../etc"})
    assert r.status_code == 400
    check_ollama_error(r.json())


def test_concurrent_greedy_streams_each_return_their_text_alone(client):
    prompts = [f"Story {i}:" for i in range(16)]
    options = {"temperature": 0, "num_predict": 24}
    alone = [
        client.generate(model=LLAMA, prompt=p, raw=True, options=options).response for p in prompts
    ]

    def streamed(p: str) -> str:
        return "".join(
            c.response
            for c in client.generate(model=LLAMA, prompt=p, raw=True, options=options, stream=True)
        )

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == alone
    assert len(set(alone)) > 1


def test_concurrent_seeded_samples_each_return_their_text_alone(client):
    prompts = [f"Tale {i}:" for i in range(16)]

    def options(i: int) -> dict:
        return {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 1000 + i, "num_predict": 24}

    alone = [
        client.generate(model=LLAMA, prompt=p, raw=True, options=options(i)).response
        for i, p in enumerate(prompts)
    ]

    def streamed(i: int) -> str:
        return "".join(
            c.response
            for c in client.generate(
                model=LLAMA, prompt=prompts[i], raw=True, options=options(i), stream=True
            )
        )

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(streamed, range(16)))
    assert together == alone


def test_steady_state_never_recompiles(client, live_server):
    client.generate(model=LLAMA, prompt="Hi", options=GREEDY)
    before = live_server.batch_stats()["compiled"]
    variants = [{"temperature": 0.3, "top_k": 5, "seed": 1}, {"temperature": 1.5, "top_p": 0.5, "min_p": 0.1},
                {"repeat_penalty": 1.3, "repeat_last_n": 8, "presence_penalty": 0.5, "frequency_penalty": 0.2},
                {"temperature": 0, "stop": ["a"]}]

    def run(i: int) -> None:
        client.generate(model=LLAMA, prompt="Hi" * (1 + i % 3), raw=True, logprobs=bool(i % 2), top_logprobs=i % 3,
                        options={**variants[i % 4], "num_predict": 6})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(run, range(16)))
    assert live_server.batch_stats()["compiled"] == before


TEXTS = ["The quick brown fox.", "A journey of a thousand miles."]


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def test_embed_normalises_mrs_embed_and_legacy_embeddings_returns_it_as_is(client, embedder,
                                                                          raw_embedder_here):
    """/api/embed L2-normalises the model's pipeline output (mrs.embed); the legacy
    /api/embeddings returns that output as it is, as Ollama's does (its route adds no
    normalisation). all-MiniLM-L6-v2's pipeline ends in Normalize, so both give unit
    vectors there; RAW_EMBEDDER, the same weights without it, shows the difference."""
    from mrs.embedding import embed_texts

    reference = embed_texts(raw_embedder_here, TEXTS)
    raw = np.asarray(reference.vectors)
    assert np.all(np.abs(np.linalg.norm(raw, axis=1) - 1) > 0.5)  # far from unit length
    for model, pipeline in ((embedder, unit(raw)), (RAW_EMBEDDER, raw)):
        r = client.embed(model=model, input=TEXTS)
        np.testing.assert_allclose(r.embeddings, unit(raw), rtol=1e-5, atol=1e-5)
        assert r.prompt_eval_count == sum(reference.token_counts)
        assert r.total_duration > 0
        for text, expected in zip(TEXTS, pipeline, strict=True):
            legacy = client.embeddings(model=model, prompt=text)
            np.testing.assert_allclose(legacy.embedding, expected, rtol=1e-5, atol=1e-5)
        single = client.embed(model=model, input=TEXTS[0])
        np.testing.assert_allclose(single.embeddings[0], unit(raw[0]), rtol=1e-5, atol=1e-5)
        short = client.embed(model=model, input=TEXTS[0], dimensions=64)   # Matryoshka: cut, renormalise
        np.testing.assert_allclose(short.embeddings[0], unit(raw[0, :64]), rtol=1e-5, atol=1e-5)
    client.embed(model=RAW_EMBEDDER, input=[], keep_alive=0)   # unload: its slot is for other tests
    long = "word " * 600
    np.testing.assert_allclose(client.embed(model=embedder, input=long).embeddings[0],  # truncated by default
                               unit(mrs.embed(raw_embedder_here, long)[0]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=embedder, input=long, truncate=False)
    assert e.value.status_code == 400


def test_generate_on_an_embedding_model_is_a_400(client, embedder):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=embedder, prompt="Hi")
    assert e.value.status_code == 400


def test_a_model_of_ollamas_store_is_listed_and_served_by_its_name(live_server):
    """The store's GGUF (the llama fixture) answers as the folder model does, with its params' temperature 0."""
    c = live_server.client()
    names = [m["name"] for m in c.get("/api/tags").json()["models"]]
    assert OLLAMA_MODEL in names and LLAMA in names
    ask = {"prompt": "Once upon a time", "raw": True, "stream": False, "options": {"num_predict": 8, "seed": 0}}
    theirs = c.post("/api/generate", json={"model": "tiny", **ask})
    assert theirs.status_code == 200, theirs.text
    ours = c.post("/api/generate", json={"model": LLAMA, **ask,
                                         "options": {"num_predict": 8, "seed": 0, "temperature": 0}})
    assert theirs.json()["response"] == ours.json()["response"] and theirs.json()["eval_count"] == 8
    c.post("/api/generate", json={"model": "tiny", "keep_alive": 0})


def test_the_system_layer_of_an_ollama_model_is_its_default_system_prompt(live_server):
    """Every chat route puts the store's system prompt first when the request brings none,
    and the request's own when it does: each answers as the folder model given that prompt."""
    c = live_server.client()
    user = [{"role": "user", "content": "Hi"}]
    options = {"num_predict": 6, "temperature": 0}

    def ollama_chat(model: str, messages: list) -> dict:
        r = c.post("/api/chat", json={"model": model, "messages": messages, "stream": False, "options": options})
        assert r.status_code == 200, r.text
        return r.json()

    for own in (OLLAMA_SYSTEM, "Hm"):
        expected = ollama_chat(LLAMA, [{"role": "system", "content": own}, *user])
        given = user if own == OLLAMA_SYSTEM else [{"role": "system", "content": own}, *user]
        got = ollama_chat("tiny", given)
        # (Not prompt_eval_count: it counts only the tokens a slot did not already hold.)
        assert got["message"] == expected["message"]
    bare = ollama_chat(LLAMA, user)
    assert bare["message"] != ollama_chat("tiny", user)["message"]   # the system prompt changes the answer

    ask = {"prompt": "Hi", "stream": False, "options": options}
    theirs = c.post("/api/generate", json={"model": "tiny", **ask}).json()
    ours = c.post("/api/generate", json={"model": LLAMA, "system": OLLAMA_SYSTEM, **ask}).json()
    assert theirs["response"] == ours["response"]

    def openai_chat(model: str, messages: list) -> dict:
        return c.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 6,
                                                    "temperature": 0}).json()

    # OpenAI's usage counts the whole prompt (cached or not): the system prompt is in it.
    theirs = openai_chat("tiny", user)
    ours = openai_chat(LLAMA, [{"role": "system", "content": OLLAMA_SYSTEM}, *user])
    assert theirs["usage"]["prompt_tokens"] == ours["usage"]["prompt_tokens"] > \
        openai_chat(LLAMA, user)["usage"]["prompt_tokens"]
    assert theirs["choices"][0]["message"] == ours["choices"][0]["message"]
    c.post("/api/generate", json={"model": "tiny", "keep_alive": 0})
