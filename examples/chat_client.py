"""Ask a vLLM-served qvlm LLaVA about an image through the OpenAI chat API.

Start a server first (``examples/serve.sh``), then::

    uv run python examples/chat_client.py                        # generated shape image
    uv run python examples/chat_client.py --image photo.jpg --question "What is in the image?"
    uv run python examples/chat_client.py --base-url http://127.0.0.1:8001/v1 --model /path/to/model

The image travels inline as a base64 ``data:image/png`` URL (the server needs no file or
network access). The script sends the same request twice: once non-streaming, once
streaming (printing tokens as they arrive), both greedy, and prints both answers.
With the tiny demo model the answers are random words: its weights are random.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time


def shape_image(size: int = 64):
    """A small picture of a red circle on a blue square (no files needed)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.rectangle([size // 8, size // 8, size * 7 // 8, size * 7 // 8], fill=(30, 60, 200))
    d.ellipse([size // 4, size // 4, size * 3 // 4, size * 3 // 4], fill=(220, 30, 30))
    return img


def image_data_url(path: str | None) -> str:
    """``data:image/png;base64,...`` for the file at ``path`` (re-encoded as PNG) or the generated image."""
    from PIL import Image

    img = shape_image() if path is None else Image.open(path).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def messages(question: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": question},
    ]}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Chat with a vLLM-served qvlm LLaVA about an image (OpenAI API).")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                   help="server's OpenAI API root (default: %(default)s)")
    p.add_argument("--model", default=None, help="model name (default: the first one the server lists at /v1/models)")
    p.add_argument("--image", default=None, help="image file to send (default: a generated 64x64 shape picture)")
    p.add_argument("--question", default="What shape is in the image?",
                   help="text sent with the image (default: %(default)r)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default: %(default)s)")
    p.add_argument("--api-key", default="EMPTY",
                   help="API key, if the server was started with --api-key (default: none)")
    args = p.parse_args(argv)

    from openai import OpenAI

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=120.0, max_retries=0)
    model = args.model or client.models.list().data[0].id
    msgs = messages(args.question, image_data_url(args.image))
    print(f"model: {model}\nquestion: {args.question}\nimage: {args.image or 'generated 64x64 shape picture'}")

    t0 = time.perf_counter()
    resp = client.chat.completions.create(model=model, messages=msgs, max_tokens=args.max_tokens, temperature=0.0)
    dt = time.perf_counter() - t0
    u = resp.usage
    print(f"\n[non-streaming, {dt:.2f} s, {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens, "
          f"finish_reason={resp.choices[0].finish_reason}]")
    print(resp.choices[0].message.content)

    print("\n[streaming]")
    t0 = time.perf_counter()
    first, parts = None, []
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=args.max_tokens,
                                            temperature=0.0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    dt = time.perf_counter() - t0
    print(f"\n[streamed {len(parts)} chunks in {dt:.2f} s, first after {first or 0:.2f} s]")
    same = "".join(parts) == resp.choices[0].message.content
    print(f"streaming and non-streaming answers {'agree' if same else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
