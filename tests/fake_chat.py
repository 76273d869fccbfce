"""A stand-in model and chat session that stream a fixed answer, for testing the chat REPL
and the markdown renderer without a model (the fixture models answer gibberish).

Run as a script it is `mrs chat` with that fake session, for pseudo-terminal tests:

    python tests/fake_chat.py ANSWER_FILE [DELAY_SECONDS]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

MARKDOWN_ANSWER = '''\
# Fibonacci in Python

Here is a **short** recursive version with `functools.cache`:

```python
from functools import cache

@cache
def fib(n: int) -> int:
    """The n-th Fibonacci number."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)

print([fib(i) for i in range(10)])
```

- It runs in *linear* time thanks to the cache.
- For big `n`, prefer the iterative form.

| n  | fib(n) |
|----|--------|
| 10 | 55     |
| 20 | 6765   |

> Tip: `sys.setrecursionlimit` helps for deep recursion.
'''


class FakeModel:
    def __init__(self, name: str = "acme/fake"):
        self.name = name


class FakeSession:
    """Streams ``answer`` in small pieces; records each call. ``interrupt_after`` raises
    KeyboardInterrupt after that many pieces (Ctrl-C in the middle of an answer)."""

    def __init__(self, model, answer: str = "Hello there.", delay: float = 0.0, interrupt_after: int | None = None):
        self.model, self.answer, self.delay, self.interrupt_after = model, answer, delay, interrupt_after
        self.calls: list[tuple[list[dict], dict]] = []
        self.resets = 0
        self.last = None
        self.last_prefill_tokens = 0

    def stream(self, messages, **options):
        self.calls.append(([dict(m) for m in messages], dict(options)))
        for i in range(0, len(self.answer), 5):
            if self.interrupt_after is not None and i // 5 == self.interrupt_after:
                self.interrupt_after = None  # once
                raise KeyboardInterrupt
            if self.delay:
                time.sleep(self.delay)
            yield self.answer[i:i + 5]

    def reset(self):
        self.resets += 1


def main() -> int:
    from mrs.chat import Chat

    answer = Path(sys.argv[1]).read_text() if len(sys.argv) > 1 else MARKDOWN_ANSWER
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.01
    chat = Chat(FakeModel(), make_session=lambda model: FakeSession(model, answer, delay))
    return chat.run()


if __name__ == "__main__":
    sys.exit(main())
