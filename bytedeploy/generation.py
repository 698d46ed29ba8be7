"""What a generate call asks for and what it returns, for every family and backend."""

from __future__ import annotations

from dataclasses import dataclass, field

from bytedeploy.sampling import SamplingConfig


@dataclass
class GenerateRequest:
    prompt: bytes = b""  # bytes (bGPT) or UTF-8 text (text families) to continue
    max_new: int = 0  # new tokens (bytes for bGPT) at most; 0 = the family's default
    batch_size: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    options: dict = field(default_factory=dict)  # family-specific: bGPT's ext / input / target_ext, ...


@dataclass
class GenerateResult:
    outputs: list[bytes]  # one per batch row, the newly generated content
    n_new: int  # tokens (bytes for bGPT) generated over the whole batch
    seconds: float
    unit: str = "token"
    passes: int = 0  # model forward passes (sigma-GPT burst sampling reports passes per token)
    extra: dict = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.n_new / self.seconds if self.seconds > 0 else float("inf")
