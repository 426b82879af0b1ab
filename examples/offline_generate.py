"""Offline batch generation with a progress bar.   python examples/offline_generate.py [max_tokens]"""
import sys

from asyncllm import LLM, SamplingParams

max_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 64
llm = LLM()
prompts = ["The three laws of robotics are", "A good name for a cat is", "Python is popular because"]
for out in llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0)):
    print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
