"""Completions and chat through the official OpenAI SDK against a running `tokenmill serve`.

    tokenmill serve &            # or: make serve
    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]
"""
import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY", "none"))
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id  # the server serves one model
    print(f"model: {model}\n")

    completion = client.completions.create(model=model, prompt="The three primary colors are", max_tokens=24,
                                           temperature=0)
    print("completion:", completion.choices[0].text.strip())
    print("usage:", completion.usage.model_dump(), "\n")

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "You answer in one sentence."},
                  {"role": "user", "content": "Why is the sky blue?"}],
        max_tokens=48, temperature=0.7, seed=0,
        extra_body={"top_k": 40},  # vLLM's extra sampling fields travel in the body
    )
    print("chat:", chat.choices[0].message.content.strip())
    print("finish_reason:", chat.choices[0].finish_reason)


if __name__ == "__main__":
    main()
