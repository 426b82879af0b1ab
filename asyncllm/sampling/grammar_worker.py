"""A grammar-compile worker process: compiles regexes into outlines-core Indexes.

Run as a script (`python -I grammar_worker.py`) by `grammar_pool.CompileWorker`; it imports
nothing of asyncllm (and so no torch), starts in ~0.1 s and holds only outlines-core.
Why a process and not a thread: an outlines-core compile cannot be interrupted, and a
hostile spec can run for minutes and take gigabytes. A process can be killed at its deadline,
and its address space is capped with RLIMIT_AS, so whatever it allocated goes back to the OS.

Protocol over stdin/stdout: each message is a 4-byte big-endian length and a JSON header,
optionally followed by a length-prefixed binary payload.
    -> {"op": "init", "eos": int, "memory_bytes": int, "niceness": int}  + payload: the vocabulary (JSON
       list of [hex token bytes, [ids]])
    <- {"ok": true}
    -> {"op": "compile", "regex": str}
    <- {"ok": true, "seconds": float} + payload: the Index's binary form (Index.from_binary)
    <- {"ok": false, "error": str}
"""
from __future__ import annotations

import json
import os
import resource
import struct
import sys
import time

_LEN = struct.Struct(">I")


def read_frame(stream) -> bytes | None:
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (size,) = _LEN.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def write_frame(stream, data: bytes) -> None:
    stream.write(_LEN.pack(len(data)))
    stream.write(data)


def index_binary(index) -> bytes:
    """The Index's own serialised form (what pickling it would carry), without pickle."""
    _constructor, (data,) = index.__reduce__()
    return data


def main() -> int:
    from outlines_core import Index, Vocabulary

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    vocabulary = None
    while True:
        frame = read_frame(stdin)
        if frame is None:
            return 0
        message = json.loads(frame)
        if message["op"] == "init":
            payload = read_frame(stdin)
            mapping = {bytes.fromhex(token): ids for token, ids in json.loads(payload)}
            vocabulary = Vocabulary(message["eos"], mapping)
            limit = int(message["memory_bytes"])
            if limit > 0:
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            os.nice(int(message.get("niceness", 0)))  # yield the CPU to the engine's own threads
            write_frame(stdout, json.dumps({"ok": True}).encode())
            stdout.flush()
            continue
        started = time.perf_counter()
        try:
            data = index_binary(Index(message["regex"], vocabulary))
        except MemoryError:
            write_frame(stdout, json.dumps({"ok": False, "error": "out of memory", "memory": True}).encode())
        except Exception as exc:  # noqa: BLE001 - reported to the request that asked
            write_frame(stdout, json.dumps({"ok": False, "error": str(exc)[:500]}).encode())
        else:
            write_frame(stdout, json.dumps({"ok": True, "seconds": time.perf_counter() - started}).encode())
            write_frame(stdout, data)
        stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
