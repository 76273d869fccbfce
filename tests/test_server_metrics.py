"""/metrics on the live server: Prometheus' own parser reads it, and its counters,
histograms and gauges move with the requests the test sends."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import LLAMA, SETTINGS

pytest_plugins = ["server_fixtures"]


def scrape(server) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one scrape, through Prometheus' parser."""
    with server.client() as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def moved(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_requests_tokens_and_latencies(live_server):
    before = scrape(live_server)
    with live_server.client() as c:
        done = [c.post("/v1/generate", json={"prompt": p, "model": LLAMA, "max_tokens": n, "temperature": 0}).json()
                for p, n in (("Once upon a time", 7), ("The sea", 4))]
        assert c.post("/v1/generate", json={"prompt": 3}).status_code == 400
        assert c.get("/no/such/route").status_code == 404
    after = scrape(live_server)
    assert moved(before, after, "mrs_requests_total", route="/v1/generate", status="200") == 2
    assert moved(before, after, "mrs_requests_total", route="/v1/generate", status="400") == 1
    assert moved(before, after, "mrs_requests_total", route="unmatched", status="404") == 1
    assert moved(before, after, "mrs_request_duration_seconds_count", route="/v1/generate") == 3
    generated = sum(d["completion_tokens"] for d in done)
    assert generated >= 2 and moved(before, after, "mrs_generated_tokens_total", model=LLAMA) == generated
    assert moved(before, after, "mrs_prompt_tokens_total", model=LLAMA) == sum(d["prompt_tokens"] for d in done)
    for histogram in ("mrs_time_to_first_token_seconds", "mrs_queue_wait_seconds", "mrs_generation_duration_seconds"):
        assert moved(before, after, histogram + "_count", model=LLAMA) == 2, histogram
        assert moved(before, after, histogram + "_sum", model=LLAMA) > 0, histogram
    assert moved(before, after, "mrs_time_per_output_token_seconds_count", model=LLAMA) == sum(
        d["completion_tokens"] > 1 for d in done)
    assert after[("mrs_loaded_models", ())] >= 1
    assert after[("mrs_slots", (("model", LLAMA),))] == int(SETTINGS["MRS_MAX_BATCH"])


def test_a_stream_is_counted_and_timed_to_its_end(live_server):
    before = scrape(live_server)
    body = {"prompt": "Once upon a time", "model": LLAMA, "max_tokens": 40, "temperature": 0}
    with live_server.client() as c, c.stream("POST", "/v1/generate_stream", json=body) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    assert any(line.startswith("event: done") for line in lines)
    after = scrape(live_server)
    assert moved(before, after, "mrs_requests_total", route="/v1/generate_stream", status="200") == 1
    assert moved(before, after, "mrs_generation_duration_seconds_count", model=LLAMA) == 1
    assert after[("mrs_busy_slots", (("model", LLAMA),))] == 0 and after[("mrs_queue_depth", (("model", LLAMA),))] == 0


def test_reused_prompt_tokens_are_counted_and_the_tokens_held_for_reuse_gauged(live_server):
    before = scrape(live_server)
    body = {"prompt": "A prefix that the second request repeats", "model": LLAMA, "max_tokens": 5,
            "temperature": 0}
    with live_server.client() as c:
        first, second = (c.post("/v1/generate", json=body).json() for _ in range(2))
    assert second["text"] == first["text"]
    assert second["cached_tokens"] == second["prompt_tokens"] - 1    # all but the token that starts decoding
    after = scrape(live_server)
    assert moved(before, after, "mrs_cached_prompt_tokens_total", model=LLAMA) == \
        first["cached_tokens"] + second["cached_tokens"]
    # At least the second request's slot holds its prompt and the tokens decode fed it.
    assert after[("mrs_cached_prefix_tokens", (("model", LLAMA),))] >= second["prompt_tokens"] + 4


def test_live_gauges_read_each_loaded_models_batcher_at_scrape_time():
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from mrs.server.metrics import Metrics

    stats = {"slots": 4, "busy": 3, "queued": 5, "cached": 40}
    decoder = SimpleNamespace(name="a/decoder", batcher=SimpleNamespace(stats=lambda: dict(stats)))
    embedder = SimpleNamespace(name="an/embedder", batcher=None)
    models = [decoder, embedder]
    metrics = Metrics(lambda: SimpleNamespace(loaded=lambda: list(models)))

    def read() -> dict:
        text = generate_latest(metrics.registry).decode()
        return {(s.name, tuple(s.labels.values())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    first = read()
    assert first[("mrs_loaded_models", ())] == 2
    assert (first[("mrs_busy_slots", ("a/decoder",))], first[("mrs_slots", ("a/decoder",))],
            first[("mrs_queue_depth", ("a/decoder",))], first[("mrs_cached_prefix_tokens", ("a/decoder",))]) \
        == (3, 4, 5, 40)
    assert not any("an/embedder" in labels for _, labels in first)      # no batch, no slot gauges
    stats.update(busy=0, queued=0, cached=7)
    models.pop()
    second = read()
    assert second[("mrs_busy_slots", ("a/decoder",))] == 0 and second[("mrs_loaded_models", ())] == 1
    assert second[("mrs_cached_prefix_tokens", ("a/decoder",))] == 7
    assert Metrics(lambda: None).registry.get_sample_value("mrs_loaded_models") == 0   # before the manager starts


def test_metrics_need_the_api_key_like_the_other_routes(live_server):
    assert httpx.get(live_server.url + "/metrics").status_code == 401
