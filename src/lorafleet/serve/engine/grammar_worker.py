"""The grammar sandbox's worker process: compiles one tenant's constraint at a time, held to limits.

Started by `grammar_sandbox.GrammarSandbox` as `python -m lorafleet.serve.engine.grammar_worker`
(a fresh interpreter, never a fork of the server, which holds torch and the model). It reads JSON
lines on stdin and answers each on stdout. The first line sets it up: the tokenizer
(`grammar.tokenizer_spec`) and the limits (`grammar.GrammarLimits`); then each line is a
constraint, {"kind": "json_schema" | "tool_calls", "spec": {...}}, answered with {"grammar": text}
when it compiles within the limits, or {"error": message} when it does not.

Compiling here means all that the server will do with the grammar before its first row: build
the matcher under llguidance's limits and compute its first mask. What llguidance cannot be
asked to stop is stopped from outside: the address space is capped (RLIMIT_AS) at what the
worker holds once set up plus `compile_memory_mb`, so a compile that grows past it ends the
process (Rust aborts when an allocation fails); the server kills the worker when a compile
outlasts `compile_timeout_s`, and RLIMIT_CPU stops it even if the server is gone. A worker that
was stopped is replaced, never reused.
"""

from __future__ import annotations

import json
import os
import resource
import sys

from lorafleet.serve.engine.grammar import GrammarError, GrammarLimits, Grammars, grammar_text


def main() -> None:
    os.nice(10)  # a compile yields the CPU to the server's engine and event loop
    setup = _read()
    limits = GrammarLimits(**setup["limits"])
    grammars = Grammars(setup["tokenizer"], limits)
    _cap_address_space(limits.compile_memory_mb)
    _write({"ready": True})
    while (request := _read()) is not None:
        _cap_cpu(limits.compile_timeout_s)
        try:
            _write({"grammar": compile_checked(grammars, request["kind"], request["spec"])})
        except GrammarError as err:
            _write({"error": str(err)})
        except MemoryError:
            _write({"error": "memory"})  # the server words it; this interpreter may be unusable now
            return
        except RecursionError:
            _write({"error": "the schema nests too deeply to be used for constrained decoding"})
        except Exception as err:  # whatever else a tenant's input makes the compiler raise is still its input's
            _write({"error": f"the schema cannot be used for constrained decoding: {type(err).__name__}: {err}"})


def compile_checked(grammars: Grammars, kind: str, spec: dict) -> str:
    """The constraint's grammar, compiled as the server will compile it (its matcher and first
    mask: `Grammars.compiled`); GrammarError when it cannot be used."""
    text = grammar_text(kind, spec)
    grammars.compiled(text)
    return text


def _cap_address_space(megabytes: int) -> None:
    """What the worker holds now (interpreter, llguidance, the tokenizer) plus `megabytes`."""
    with open("/proc/self/statm") as statm:
        held = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = held + megabytes * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _cap_cpu(seconds: float) -> None:
    """CPU time for this compile: the kernel ends the worker past it, should the server not."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    limit = int(usage.ru_utime + usage.ru_stime + seconds) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _read() -> dict | None:
    line = sys.stdin.buffer.readline()
    return json.loads(line) if line else None  # end of input: the server has gone


def _write(message: dict) -> None:
    sys.stdout.buffer.write(json.dumps(message).encode() + b"\n")
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
