"""Native loop of sigma-GPT: the eager backend's cached autoregressive sampling in a given order (left to right or
random, options["order"]), one captured step per token. Burst sampling stays eager (its accepted run lengths are
data-dependent shapes); this is the one-token-per-pass loop."""

from __future__ import annotations

import time

import torch

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models import sigma_gpt
from bytedeploy.models.sampling import make_generator, sample
from bytedeploy.runtimes.native import cached_runner, capture, gpt2_step, sampling_key, step_mask, sync


class OrderedRunner:
    """Static buffers: orders, seq (B, L) by position; logits (B, V); i (1,) the order index of the next draw.
    One step: draw the token at order index i, write it at its position, feed it (position orders[i], next
    position orders[i + 1]) at cache slot i to get the logits of order index i + 1."""

    def __init__(self, model, batch_size: int, length: int, sampling):
        device = model.wte.weight.device
        self.model, self.L, self.sampling = model, length, sampling
        self.generator = make_generator(sampling.seed, device)
        self.caches = model.transformer.make_caches(batch_size, length)
        self.orders = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        self.seq = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        self.logits = torch.zeros(batch_size, model.cfg.vocab_size, dtype=torch.float32, device=device)
        self.i = torch.zeros(1, dtype=torch.long, device=device)
        self.positions = torch.arange(length, device=device)
        self.graphs = {"step": capture(self.step, self.generator)}

    def step(self) -> None:
        model = self.model
        token = sample(self.logits, self.sampling, self.generator)
        here = self.orders.index_select(1, self.i)  # (B, 1) the drawn token's position
        self.seq.scatter_(1, here, token[:, None])
        following = self.orders.index_select(1, (self.i + 1).clamp(max=self.L - 1))  # the last step's is unused
        h = gpt2_step(model.transformer, model.wte(token[:, None]), self.caches, self.i,
                      step_mask(self.positions, self.i), pos_emb=model.double_positions(here, following))
        self.logits.copy_(model.lm_head(h)[:, -1])
        self.i.add_(1)

    def run(self, prompt: list[int], orders: torch.Tensor, seed: int) -> torch.Tensor:
        self.generator.manual_seed(seed)
        P = len(prompt)
        self.orders.copy_(orders)
        self.seq.zero_()
        self.seq[:, :P] = torch.tensor(prompt, device=self.seq.device)
        logits = self.model.logits(self.seq[:, :P], self.orders[:, :P], self.orders[:, 1:P + 1], self.caches, 0)
        self.logits.copy_(logits[:, -1])
        self.i.fill_(P)
        for _ in range(P, self.L):
            self.graphs["step"].replay()
        return self.seq


def generate(model, cfg, request: GenerateRequest) -> GenerateResult:
    tokenizer = sigma_gpt.load_tokenizer({"assets": request.options.get("assets")})
    if tokenizer is None:
        raise UserError("sigma-gpt generation needs the checkpoint's tokenizer (assets/tokenizer.json)")
    prompt, n_new = sigma_gpt.plan_prompt(cfg, tokenizer, request)
    P, B, sampling = len(prompt), request.batch_size, request.sampling
    orders = sigma_gpt.generation_orders(P, n_new, B, request.options.get("order", "left-to-right"), sampling.seed)
    device = model.wte.weight.device
    sync()
    t0 = time.perf_counter()
    key = ("sigma-gpt", B, P + n_new, sampling_key(sampling))
    runner = cached_runner(model, key, lambda: OrderedRunner(model, B, P + n_new, sampling))
    rows = runner.run(prompt, torch.tensor(orders, device=device), sampling.seed)[:, P:].tolist()
    sync()
    seconds = time.perf_counter() - t0
    outputs = [tokenizer.decode(r).encode("utf-8") for r in rows]
    return GenerateResult(outputs, n_new * B, seconds, sigma_gpt.UNIT, passes=n_new * B,
                          extra={"captured": runner.captured_now, "graphs": sorted(runner.graphs)})
