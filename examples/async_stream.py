"""Streaming inside asyncio code.   python examples/async_stream.py [max_tokens]"""
import asyncio
import sys

from asyncllm import AsyncEngine


async def main(max_tokens: int) -> None:
    async with AsyncEngine.from_args() as engine:
        async for text in engine.stream([{"role": "user", "content": "Tell me a short joke."}],
                                        max_tokens=max_tokens, temperature=0):
            print(text, end="", flush=True)
        print()


asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 64))
