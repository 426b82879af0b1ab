"""What make gpu-check needs on a GPU machine that cannot reach a package registry, gathered here
into .gpu/ (git-ignored; the device tool carries it): wheels of the project's pure dependencies that
the machine's CUDA image lacks, pinned to the versions this venv runs, and the default model's
tokenizer as a HF folder (the tiny test models and the random benchmark models use it; the 94 MB
default GGUF itself is over the 64 MiB the tool carries).

    python benchmarks/gpu_bundle.py [--dest .gpu] [--python-version 3.12]
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys

# import asyncllm, its Triton kernels, the tests on them and gpu_bench.py need these beyond the
# CUDA image's packages (torch, triton, transformers, tokenizers, safetensors, numpy, jinja2, tqdm,
# anyio, prometheus-client, pytest, pytest-timeout, hypothesis: see the device tool's KINDS.md).
PACKAGES = ("gguf", "msgspec", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "sniffio",
            "outlines-core", "llguidance")
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dest", default=".gpu")
    parser.add_argument("--python-version", default="3.12")
    args = parser.parse_args(argv)
    wheels = os.path.join(args.dest, "wheels")
    shutil.rmtree(args.dest, ignore_errors=True)
    os.makedirs(wheels)
    pins = [f"{name}=={metadata.version(name)}" for name in PACKAGES]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               args.python_version, "--implementation", "cp", "-d", wheels, *pins]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command, check=True)
    from asyncllm.model.default_model import default_model_path
    from asyncllm.model.tokenizer import load_gguf_tokenizer

    load_gguf_tokenizer(default_model_path()).save_pretrained(os.path.join(args.dest, "tokenizer"))
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(args.dest) for f in files)
    print(f"{args.dest}: {len(os.listdir(wheels))} wheels ({', '.join(pins)}) and the tokenizer, "
          f"{size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
