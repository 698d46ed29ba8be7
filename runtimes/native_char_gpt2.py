"""Native loop of char GPT-2: runtimes.native.WindowedLM over the model's own modules."""

from __future__ import annotations

import time

from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models import char_gpt2
from bytedeploy.runtimes.native import WindowedLM, cached_runner, gpt2_step, sampling_key, sync


def make_runner(model, batch_size: int, n0: int, max_new: int, sampling, unknown_id: int) -> WindowedLM:
    caches = model.transformer.make_caches(batch_size, model.cfg.block_size)

    def step(tokens, slot, key_mask):
        return model.lm_head(gpt2_step(model.transformer, model.wte(tokens), caches, slot, key_mask))[:, -1]

    def prefill(tokens):
        return model.logits(tokens, caches, 0)[:, -1]

    return WindowedLM(batch_size, n0, max_new, model.cfg.block_size, model.cfg.vocab_size, model.wte.weight.device,
                      sampling, step, window_pass=lambda window: model.logits(window)[:, -1], prefill=prefill,
                      transform=lambda logits: char_gpt2.mask_unknown(logits, unknown_id))


def generate(model, cfg, request: GenerateRequest) -> GenerateResult:
    tokenizer = char_gpt2.load_tokenizer(request.options)
    if tokenizer is None:
        from bytedeploy.errors import UserError

        raise UserError("char-gpt2 generation needs the checkpoint's tokenizer (options['assets'])")
    window = char_gpt2.prompt_ids(request, tokenizer)[-cfg.block_size:]
    max_new = request.max_new or char_gpt2.DEFAULT_MAX_NEW
    B = request.batch_size
    sync()
    t0 = time.perf_counter()
    key = ("char-gpt2", B, len(window), max_new, sampling_key(request.sampling), tokenizer.unknown_id)
    runner = cached_runner(model, key, lambda: make_runner(model, B, len(window), max_new, request.sampling,
                                                           tokenizer.unknown_id))
    rows = runner.run(window, request.sampling.seed).tolist()
    sync()
    seconds = time.perf_counter() - t0
    outputs = [tokenizer.decode(row).encode("utf-8") for row in rows]
    return GenerateResult(outputs, sum(len(r) for r in rows), seconds, char_gpt2.UNIT,
                          extra={"captured": runner.captured_now, "graphs": sorted(runner.graphs)})
