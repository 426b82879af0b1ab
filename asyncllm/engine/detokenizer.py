"""Incremental detokenization and stop-string detection for one output sequence.

Text comes from `tokenizers`' DecodeStream, which buffers a token until its bytes form
valid UTF-8, so a multi-byte character split across tokens never shows up as U+FFFD.
The stream is primed with the prompt's last tokens so the first output token gets the
same leading space it would have inside the full text.
"""
from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

_PRIME_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop_str_in_output: bool):
        self._backend = tokenizer.backend_tokenizer
        prime = prompt_token_ids[-_PRIME_TOKENS:]
        self._stream = DecodeStream(ids=prime, skip_special_tokens=skip_special_tokens)
        self.text = ""
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        # A stop string may begin in the last (longest stop - 1) characters: those are held back
        # from streamed output until more text shows whether a stop string completes there.
        self.hold_back = max((len(s) for s in stop), default=1) - 1

    def add_token(self, token_id: int) -> str | None:
        """Appends one token's text; returns the stop string it completed, if any."""
        piece = self._stream.step(self._backend, token_id)
        if not piece:
            return None
        search_from = max(0, len(self.text) - self.hold_back)
        self.text += piece
        for stop in self.stop:
            idx = self.text.find(stop, search_from)
            if idx != -1:
                self.text = self.text[:idx + len(stop)] if self.include_stop else self.text[:idx]
                return stop
        return None

    def emittable_length(self, finished: bool) -> int:
        """How much of the text may be shown now (everything once the sequence is finished)."""
        if finished or not self.stop:
            return len(self.text)
        return max(0, len(self.text) - self.hold_back)
