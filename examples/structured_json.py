"""A pydantic model out of the model.   python examples/structured_json.py [max_tokens]"""
import asyncio
import sys

from pydantic import BaseModel, Field

from asyncllm import AsyncEngine


class Recipe(BaseModel):
    title: str = Field(max_length=40)
    minutes: int = Field(ge=1, le=240)
    ingredients: list[str] = Field(max_length=5)


async def main(max_tokens: int) -> None:
    async with AsyncEngine.from_args() as engine:
        recipe = await engine.complete_json([{"role": "user", "content": "A simple pancake recipe as JSON."}],
                                            Recipe, max_tokens=max_tokens, temperature=0,
                                            repetition_penalty=1.2)
        print(repr(recipe))


asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
