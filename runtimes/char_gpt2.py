"""Char GPT-2 sampling loop on a bundle's step graphs: char_gpt2.generate_cached over a runner.

runtimes/windowed.py's loop; the graphs exclude the unknown symbol from every choice (exporters/char_gpt2.py).
"""

from __future__ import annotations

import time

from bytedeploy.families import char_gpt2
from bytedeploy.generation import GenerateRequest, GenerateResult, map_steps, stepwise
from bytedeploy.runtimes.windowed import generate_windowed


@stepwise
def generate(bundle, runner, request: GenerateRequest) -> GenerateResult:
    cfg = bundle.family_config()
    tokenizer = char_gpt2.load_tokenizer({"assets": str(bundle.assets)})
    ids = char_gpt2.prompt_ids(request, tokenizer)
    max_new = request.max_new or char_gpt2.DEFAULT_MAX_NEW
    decode = lambda rows: [tokenizer.decode(row).encode("utf-8") for row in rows]
    t0 = time.perf_counter()
    rows = yield from map_steps(generate_windowed.steps(bundle, runner, cfg.block_size, ids, max_new,
                                                        request.sampling, request.batch_size), decode)
    seconds = time.perf_counter() - t0
    return GenerateResult(decode(rows), rows.size, seconds, char_gpt2.UNIT)
