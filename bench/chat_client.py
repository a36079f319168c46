"""A multi-turn, streaming conversation with a running ``scalelab serve``, through the official ``openai`` client.

    scalelab serve runs/smollm2 --port 8000 &
    python bench/chat_client.py --url http://127.0.0.1:8000/v1

Turn 1 and 2 are plain requests (turn 2 carries turn 1's reply back, so the server renders a
multi-turn conversation with the model's chat template); turn 3 is streamed, and the streamed
text is checked against the same request sent without streaming (greedy, so they must agree).
Prints each reply, prompt/completion token counts, and the time to the first streamed token.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="unused")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    from openai import OpenAI  # optional: the dev extra has it

    client = OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id
    messages = [{"role": "system", "content": "You are a concise assistant."}]
    for question in ("What is the capital of France?", "And what is the capital of Germany?"):
        messages.append({"role": "user", "content": question})
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens, temperature=0)
        reply = r.choices[0].message.content
        messages.append({"role": "assistant", "content": reply})
        print(f"user: {question}\nassistant: {reply}\n  ({r.usage.prompt_tokens} prompt tokens, "
              f"{r.usage.completion_tokens} completion tokens, finish {r.choices[0].finish_reason})")
    messages.append({"role": "user", "content": "Name one famous building in the first city."})
    t0, first, pieces = time.perf_counter(), None, []
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                                temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            pieces.append(chunk.choices[0].delta.content)
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens, temperature=0)
    streamed = "".join(pieces)
    print(f"user: {messages[-1]['content']}\nassistant (streamed in {len(pieces)} chunks, first after "
          f"{first:.2f} s): {streamed}\n  streamed text equals the non-streamed reply: "
          f"{streamed == full.choices[0].message.content}")


if __name__ == "__main__":
    main()
