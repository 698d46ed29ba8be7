"""Model families by name.

A family is two modules. Its torch-free facts, bytedeploy/families/<family>.py (FACTS below; what a bundle and its
runtime loop need), provide
  Config                 dataclass of model hyperparameters (JSON-able), with a field per architecture choice
  PRESETS                {"tiny": {...}, ...} overrides of Config for named sizes ("tiny" runs CPU tests)
and its model, bytedeploy/models/<family>.py (FAMILIES below; needs torch), provides those two as well and
  Model(config)          nn.Module; forward(batch: dict[str, Tensor]) -> (mean loss, number of targets)
  make_data(config, spec, options) -> TrainData (see bytedeploy.data)
  generate(model, config, request, backend) -> GenerateResult (see bytedeploy.generation)
  BACKENDS               the generation backends it implements, "eager-reference" and "eager" at least
optionally:
  prepare_config(config, spec, options) -> config   fill data-dependent fields (vocab size) before the model is built
  LOSS_IS_NLL = False    when the training loss is not a log-likelihood (the CLI then reports plain loss)
  CLI_ALIASES            {"context": "n_patches", ...} when --context/--d-model/--layers/--heads/--order map elsewhere
Data options passed to make_data/prepare_config: eval_split, eval_data, conversion, first_mb, tokenizer (a path),
assets (the checkpoint's assets folder when one exists: load tokenizers from there).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from bytedeploy.errors import UserError

FAMILIES = {
    "bgpt": "bytedeploy.models.bgpt",
    "bitnet": "bytedeploy.models.bitnet",
    "sigma-gpt": "bytedeploy.models.sigma_gpt",
    "bfn": "bytedeploy.models.bfn",
    "char-gpt2": "bytedeploy.models.char_gpt2",
}
FACTS = {
    "bgpt": "bytedeploy.families.bgpt",
    "bitnet": "bytedeploy.families.bitnet",
    "sigma-gpt": "bytedeploy.families.sigma_gpt",
    "bfn": "bytedeploy.families.bfn",
    "char-gpt2": "bytedeploy.families.char_gpt2",
}


def family_names() -> list[str]:
    return list(FAMILIES)


def family_module(modules: dict[str, str], family: str, unknown: str) -> ModuleType:
    """modules[family] imported (a family's model, exporter or runtime loop); UserError(unknown) without one."""
    if family not in modules:
        raise UserError(unknown)
    return importlib.import_module(modules[family])


def unknown_family(name: str) -> str:
    return f"unknown model family {name!r}; known: {', '.join(family_names())}"


def get_family(name: str) -> ModuleType:
    """The family's model module (torch)."""
    return family_module(FAMILIES, name, unknown_family(name))


def family_config_class(name: str) -> type:
    """The family's Config dataclass, from its torch-free module."""
    return family_module(FACTS, name, unknown_family(name)).Config
