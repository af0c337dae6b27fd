"""The official `openai` Python package as a client of `loip serve`.

Usage: serve_openai.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)
Exits non-zero with a message on the first failed check.
"""
import sys

import openai
from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=base, api_key="test-key", max_retries=0)

models = client.models.list()
model = models.data[0].id
assert model, models

# Chat, whole.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    temperature=0,
    max_tokens=30,
)
text = r.choices[0].message.content
assert "Paris" in text, text
assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

# Chat, streamed, with usage: the same text.
parts, usage, finish = [], None, None
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    temperature=0,
    max_tokens=30,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == text, ("".join(parts), text)
assert finish == "stop", finish
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage

# Legacy completions, whole and streamed, cut by max_tokens.
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0)
assert c.choices[0].finish_reason == "length", c
streamed = "".join(
    ch.choices[0].text
    for ch in client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    )
    if ch.choices
)
assert streamed == c.choices[0].text, (streamed, c.choices[0].text)

# max_completion_tokens, seed and stop.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Count from 1 to 20."}],
    max_completion_tokens=40,
    seed=7,
    temperature=0.7,
    stop=["10"],
)
assert "10" not in r.choices[0].message.content

# Errors come back as the package's typed exceptions.
try:
    client.chat.completions.create(model=model, messages=[], max_tokens=5)
    raise SystemExit("an empty message list was accepted")
except openai.BadRequestError as e:
    assert "empty" in str(e), e
try:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=10**9
    )
    raise SystemExit("max_tokens past the context was accepted")
except openai.BadRequestError as e:
    assert "8192" in str(e), e

bad = OpenAI(base_url=base, api_key="wrong", max_retries=0)
try:
    bad.models.list()
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError:
    pass

print("openai client: all checks passed")
