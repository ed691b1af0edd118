"""lorafleet: one frozen open model, a fleet of LoRA adapters trained, compressed and served together."""

from __future__ import annotations

import logging

__version__ = "0.1.0"


class _WithoutHubKernelNotice(logging.Filter):
    """bitsandbytes (imported by peft and transformers whenever a model loads) logs "Failed to load
    CPU gemm_4bit_forward from kernels-community" on CPUs with AVX512-BF16 unless the `kernels`
    package fetches a faster 4-bit kernel from the Hugging Face Hub. lorafleet never fetches from a
    hub, and bitsandbytes' own CPU kernel serves instead, so the notice is noise on every command:
    drop that message alone; everything else bitsandbytes says still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


# Installed here, on import of lorafleet, because bitsandbytes logs it while it is first imported.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_WithoutHubKernelNotice())
