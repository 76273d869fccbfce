"""Prefix reuse as HTTP clients see it: a conversation resent each turn prefills only its
new messages (OpenAI's ``usage.prompt_tokens_details.cached_tokens``), and every answer
is what a cold run of the same conversation gives."""

from __future__ import annotations

import openai
import pytest
from server_fixtures import API_KEY, LLAMA

import mrs

pytest_plugins = ["server_fixtures"]


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_a_resent_conversation_reuses_each_previous_turn_and_answers_as_a_cold_run(client, llama_here):
    messages = [{"role": "system", "content": "Be brief."}]
    previous_prompt = 0
    for turn in range(6):
        messages.append({"role": "user", "content": f"Q{turn}?"})
        stream = turn == 5
        if stream:
            chunks = list(client.chat.completions.create(
                model=LLAMA, messages=messages, max_tokens=6, temperature=0, stream=True,
                stream_options={"include_usage": True}))
            usage = chunks[-1].usage
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            r = client.chat.completions.create(model=LLAMA, messages=messages, max_tokens=6, temperature=0)
            usage, text = r.usage, r.choices[0].message.content
        # The whole previous prompt is reused (and its reply's tokens, where they re-encode the same).
        assert usage.prompt_tokens_details.cached_tokens >= previous_prompt, (turn, usage)
        assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
        assert text == mrs.generate(llama_here, messages, max_tokens=6, temperature=0).text, turn
        messages.append({"role": "assistant", "content": text})
        previous_prompt = usage.prompt_tokens


def test_a_prompt_no_slot_holds_reports_nothing_cached(client):
    r = client.completions.create(model=LLAMA, prompt=[7, 300, 301, 302, 303, 304, 305, 306], max_tokens=3,
                                  temperature=0)
    assert r.usage.prompt_tokens == 8 and r.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(model=LLAMA, prompt=[7, 300, 301, 302, 303, 304, 305, 306], max_tokens=3,
                                      temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 7
    assert again.choices[0].text == r.choices[0].text
