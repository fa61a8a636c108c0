"""A terminal chat that prints the assistant's tokens as they arrive. Ctrl-D or Ctrl-C quits.

    tokenmill serve &
    python examples/streaming_chat.py [--base-url http://127.0.0.1:8000/v1] [--system "..."]
"""
import argparse
import os
import sys

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY", "none"))
    parser.add_argument("--system", default="You are a helpful assistant.")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    history = [{"role": "system", "content": args.system}]
    interactive = sys.stdin.isatty()
    while True:
        try:
            user = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not user:
            break  # end of piped input
        if not user.strip():
            continue
        history.append({"role": "user", "content": user.strip()})
        print("assistant> ", end="", flush=True)
        reply = ""
        stream = client.chat.completions.create(model=model, messages=history, max_tokens=args.max_tokens,
                                                stream=True, stream_options={"include_usage": True})
        try:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    reply += chunk.choices[0].delta.content
                    print(chunk.choices[0].delta.content, end="", flush=True)
                elif chunk.usage:
                    print(f"\n  [{chunk.usage.completion_tokens} tokens]", flush=True)
        except KeyboardInterrupt:  # stop this answer; closing the stream aborts it on the server
            stream.close()
            print()
        history.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    main()
