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


NATIVE_BACKENDS = ("native", "native+compile")  # runtimes/native.py: CUDA graphs over the checkpoint's model


def checkpoint_backends(family_module) -> tuple[str, ...]:
    """The backends that run a checkpoint of this family: its own eager loops, then the native GPU runtime."""
    return tuple(family_module.BACKENDS) + NATIVE_BACKENDS


def generate_from_checkpoint(model, cfg, family: str, request: GenerateRequest, backend: str) -> GenerateResult:
    """Sample from a loaded checkpoint with one of checkpoint_backends(family); the one dispatch used by the
    generate and bench commands."""
    import dataclasses

    from bytedeploy.errors import UserError
    from bytedeploy.registry import get_family

    fam = get_family(family)
    if backend not in checkpoint_backends(fam):
        raise UserError(f"{family} has no backend {backend!r}; available: {', '.join(checkpoint_backends(fam))}")
    if backend in NATIVE_BACKENDS:
        from bytedeploy.runtimes.native import generate as generate_native

        if backend == "native+compile":
            if family != "bgpt":
                raise UserError("native+compile is implemented for bgpt; use --backend native")
            request = dataclasses.replace(request, options=dict(request.options, compile=True))
        return generate_native(model, cfg, family, request)
    return fam.generate(model, cfg, request, backend)
