"""Image input (LLaVA-style models): loading images safely, prompt placeholders, hand-offs to workers."""
