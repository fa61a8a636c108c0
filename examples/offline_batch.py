"""Generate for every line of a prompts file with LLM.generate (no server), with a progress bar.

    python examples/offline_batch.py [examples/prompts.txt] [--max-tokens 48] [--model PATH]
"""
import argparse
from pathlib import Path

from tokenmill.engine import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="?", default=str(Path(__file__).with_name("prompts.txt")))
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: the packaged SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()

    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    llm = LLM(args.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
    # Chat models answer best through their template; LLM.chat applies it to each conversation.
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    for prompt, out in zip(prompts, llm.chat(conversations, params), strict=False):
        print(f"\n### {prompt}\n{out.outputs[0].text.strip()}")


if __name__ == "__main__":
    main()
