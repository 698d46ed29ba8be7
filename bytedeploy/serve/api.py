"""The OpenAI completions API of `bytedeploy serve`: the request body, its translation into GenerateRequests, and the
text of a choice as its bytes arrive (UTF-8 decoding and stop sequences).

Family options go under one extension field, "bytedeploy" (OpenAI clients pass it with extra_body):

  bGPT       ext            extension of the file to generate (its BOS patch) [txt]
             prompt_base64  the prompt as raw bytes, instead of "prompt"
             input_base64   conversion: the file to convert, with input_ext (its extension) and target_ext
  sigma-GPT  order          "left-to-right" or "random" (the generation order)
             burst          true: burst sampling, with n_orders scoring orders [4]
  BFN        n_steps        sampling steps [the model's]
             infill         a template with holes written [[N]] (N tokens each), instead of "prompt"

Byte-level models (bGPT, BitNet): an output, or a streamed chunk, whose text is not its bytes (they are not valid
UTF-8: the text has U+FFFD instead) carries the bytes in choices[i].bytedeploy.output_base64 as well, so that each
chunk's output_base64 where present, else its text, concatenated give the output's bytes. Stop strings apply to the
text; a request with stop strings gets no output_base64.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest
from bytedeploy.sampling import SamplingConfig

EXTENSION = "bytedeploy"
DEFAULT_MAX_TOKENS = 16  # OpenAI's; a model that makes fewer makes its most
FAMILY_OPTIONS = {  # extension field -> the family it belongs to
    "ext": "bgpt", "prompt_base64": "bgpt", "input_base64": "bgpt", "input_ext": "bgpt", "target_ext": "bgpt",
    "order": "sigma-gpt", "burst": "sigma-gpt", "n_orders": "sigma-gpt",
    "n_steps": "bfn", "infill": "bfn",
}
# OpenAI fields this server does not implement: a request that sets them otherwise than to these values is refused
UNSUPPORTED = {"echo": False, "logprobs": None, "best_of": 1, "suffix": None, "logit_bias": None,
               "presence_penalty": 0, "frequency_penalty": 0}


class Extension(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ext: str | None = None
    prompt_base64: str | None = None
    input_base64: str | None = None
    input_ext: str | None = None
    target_ext: str | None = None
    order: Literal["left-to-right", "random"] | None = None
    burst: bool | None = None
    n_orders: int | None = Field(None, ge=1)
    n_steps: int | None = Field(None, ge=1)
    infill: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, ...) are accepted and ignored

    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=1)  # null: the model's own default
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # an extension: 0 = off
    seed: int | None = Field(None, ge=0)  # None = a random seed
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    bytedeploy: Extension | None = None


def check_supported(body: CompletionRequest) -> None:
    for name, default in UNSUPPORTED.items():
        value = (body.model_extra or {}).get(name, default)
        if value != default and value is not None:
            raise UserError(f"{name} is not supported by this server")


def prompt_text(body: CompletionRequest) -> str:
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise UserError(f"prompt must be one string (a list of {len(body.prompt)} prompts was given)")
        return body.prompt[0]
    return body.prompt


def stop_strings(body: CompletionRequest) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise UserError("stop takes at most 4 non-empty strings")
    return stops


def decode_base64(value: str, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{EXTENSION}.{name} is not valid base64") from None


def family_options(ext: Extension | None, family: str) -> tuple[dict, bytes | None]:
    """The extension field -> (GenerateRequest.options, the raw prompt bytes when prompt_base64 gives them)."""
    given = ext.model_dump(exclude_none=True) if ext else {}
    for name in given:
        if FAMILY_OPTIONS[name] != family:
            raise UserError(f"{EXTENSION}.{name} is a {FAMILY_OPTIONS[name]} option; this model is {family}")
    prompt = decode_base64(given.pop("prompt_base64"), "prompt_base64") if "prompt_base64" in given else None
    if "input_base64" in given:
        given["input_data"] = decode_base64(given.pop("input_base64"), "input_base64")
    elif "input_ext" in given or "target_ext" in given:
        raise UserError(f"{EXTENSION}.input_ext and target_ext go with input_base64 (a conversion)")
    if "n_orders" in given and not given.get("burst"):
        raise UserError(f"{EXTENSION}.n_orders applies to burst sampling")
    if "order" in given and given.get("burst"):
        raise UserError(f"{EXTENSION}.order applies without burst; burst draws its own random orders")
    if "infill" in given:
        from bytedeploy.families.bfn import parse_infill

        given["infill"] = parse_infill(given["infill"])
    return given, prompt


def generate_requests(body: CompletionRequest, family: str, max_new_limit: int) -> list[GenerateRequest]:
    """One GenerateRequest per choice (n of them): choice i draws with seed + i."""
    check_supported(body)
    stop_strings(body)
    if "max_tokens" in body.model_fields_set:
        max_new = body.max_tokens or 0
    else:
        max_new = min(DEFAULT_MAX_TOKENS, max_new_limit)
    options, raw_prompt = family_options(body.bytedeploy, family)
    text = prompt_text(body)
    if raw_prompt is not None and text:
        raise UserError(f"give either prompt or {EXTENSION}.prompt_base64, not both")
    if (options.get("infill") or options.get("input_data") is not None) and text:
        raise UserError("a prompt does not go with an infill template or a conversion input")
    prompt = raw_prompt if raw_prompt is not None else text.encode("utf-8")
    seed = secrets.randbelow(2**31) if body.seed is None else body.seed
    requests = []
    for i in range(body.n):
        try:
            sampling = SamplingConfig(body.top_k, body.top_p, body.temperature, seed + i)
        except ValueError as e:
            raise UserError(str(e)) from None
        requests.append(GenerateRequest(prompt, max_new, 1, sampling, dict(options)))
    return requests


class ChoiceText:
    """A choice's text as its bytes arrive: UTF-8 decoded incrementally (an incomplete character waits for its
    next bytes), cut at the first stop string; a tail that could begin one is held back until it is decided."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""  # decoded text not yet given out
        self.stopped = False

    def feed(self, data: bytes, final: bool = False) -> str:
        """New output bytes -> the text that can be given out now ('' once stopped)."""
        if self.stopped:
            return ""
        text = self.held + self.decoder.decode(data, final)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = 0 if final else max((n for s in self.stops for n in range(len(s) - 1, 0, -1)
                                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

