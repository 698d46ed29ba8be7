"""bGPT: the file encoding, KV cache == full recompute in both decoders, the two generation loops, the importer for
the official weights, conversion and classification data, and train -> generate / eval through the CLI."""

import dataclasses
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from bytedeploy.checkpoint import load_model
from bytedeploy.cli import cli
from bytedeploy.data.files import label_of, load_records, split_records
from bytedeploy.errors import UserError
from bytedeploy.families import bgpt as bgpt_facts
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bgpt
from bytedeploy.models.bgpt import SPECIAL
from bytedeploy.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)
SMALL = dict(patch_size=8, n_patches=12, n_embd=32, n_layer=2, n_head=4, byte_n_layer=2, byte_n_head=4)
ATOL = RTOL = 1e-5  # fp32 on CPU: cached and uncached attention differ only by summation order


def make_model(std: float | None = 0.5, stop_scale: float = 1.0, seed: int = 0, **overrides):
    """A small bGPT in eval mode. std: redraw every weight from N(0, std) so that logits are far from ties (None
    keeps GPT-2's init, whose byte distributions are near uniform); stop_scale scales the 256 symbol's (tied)
    embedding: 0 makes its logit exactly 0, which greedy never picks over 256 random logits of spread ~ std."""
    cfg = bgpt.Config(**dict(SMALL, **overrides))
    torch.manual_seed(seed)
    model = bgpt.Model(cfg)
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, std)
            if cfg.task == "generate":
                model.byte_wte.weight[SPECIAL] *= stop_scale
    return model.eval(), cfg


# ----------------------------------------------------------------------------------------------- encoding


def test_file_encoding_and_inverse():
    cfg = bgpt.Config(n_patches=8)  # patches of 16: 6 of content at most
    data = bytes(range(37))
    enc = bgpt.encode_file(data, "py", cfg)
    assert enc.shape == (1 + 3 + 1, 16) and enc.dtype == np.int64
    assert enc[0].tolist() == list(b"py") + [SPECIAL] * 14  # BOS: the extension padded with 256
    assert enc[1:4].reshape(-1)[:37].tolist() == list(data)
    assert (enc[1:4].reshape(-1)[37:] == SPECIAL).all()  # file padded to a whole patch
    assert (enc[4] == SPECIAL).all()  # EOS patch
    assert bgpt.patches_to_bytes(enc[1:]) == data
    whole = bytes(range(100, 132))  # exactly two patches: no padding, then EOS
    enc = bgpt.encode_file(whole, "bin", cfg)
    assert enc.shape == (4, 16) and bgpt.patches_to_bytes(enc[1:]) == whole and (enc[3] == SPECIAL).all()
    assert bgpt.encode_file(b"", "txt", cfg).shape == (2, 16)  # BOS + EOS
    assert bgpt.encode_file(data, "py", cfg, eos=False).shape == (4, 16)
    assert bgpt_facts.ext_patch("a" * 40, 16).tolist() == [ord("a")] * 16  # long extensions are cut to a patch


def test_limit_conversion_prompt_and_partial_patch():
    cfg = bgpt.Config(n_patches=8)
    assert cfg.max_bytes == 96
    assert bgpt.encode_file(bytes(96), "bin", cfg).shape == (8, 16)
    with pytest.raises(UserError, match="exceeds the model's limit of 96 bytes"):
        bgpt.encode_file(bytes(97), "bin", cfg)
    cut = bgpt.encode_file(bytes(200), "bin", cfg, truncate=True)  # training data: the seed cuts, no EOS left
    assert cut.shape == (8, 16) and not (cut == SPECIAL).all(-1)[1:].any()

    src = b"X:1\nK:C\nCDEF GABc|"  # 19 bytes: two patches
    prompt = bgpt_facts.conversion_prompt(src, "abc", "mid", cfg)
    np.testing.assert_array_equal(prompt[:3], bgpt.encode_file(src, "abc", cfg)[:3])  # the source without EOS
    assert prompt.shape == (4, 16) and bytes(prompt[-1][:3].tolist()) == b"mid" and (prompt[-1][3:] == SPECIAL).all()
    with pytest.raises(UserError):
        bgpt_facts.conversion_prompt(bytes(97), "abc", "mid", cfg)

    patches, tail = bgpt_facts.make_prompt(cfg, GenerateRequest(b"0123456789abcdefXYZ", options={"ext": "md"}))
    assert patches.shape == (2, 16) and bytes(patches[0][:2].tolist()) == b"md"
    assert bytes(tail.tolist()) == b"XYZ"  # the partial last patch is forced into the first new patch
    with pytest.raises(UserError, match="prompt of 97 bytes"):
        bgpt.generate(make_model()[0], cfg, GenerateRequest(bytes(97)), "eager")


def test_patch_embedding_is_the_linear_over_one_hot_patches():
    model, cfg = make_model()
    P, C = cfg.patch_size, cfg.n_embd
    patches = torch.randint(0, 257, (3, 5, P))
    ours = model.embed_patches(patches)
    weight = model.patch_embedding.weight
    onehot = model.patch_embedding(F.one_hot(patches, 257).float().flatten(-2))  # the seed's definition
    table = weight.view(C, P, 257).permute(1, 2, 0)  # the earlier advanced-index gather, for exact equality
    gathered = table[torch.arange(P), patches].sum(-2) + model.patch_embedding.bias
    torch.testing.assert_close(ours, onehot, rtol=1e-6, atol=1e-6)  # fp32: a sum of P rows vs a dense matmul
    assert torch.equal(ours, gathered)
    grads = [torch.autograd.grad(out.square().sum(), weight)[0] for out in (ours, onehot, gathered)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(grads[0], grads[2])


# ----------------------------------------------------------------------------------------------- KV cache


@torch.no_grad()
def test_patch_decoder_cache_equals_full_forward():
    model, cfg = make_model()
    patches = torch.randint(0, 257, (2, cfg.n_patches, cfg.patch_size))
    full = model.encode_patches(patches)
    caches = model.patch_decoder.make_caches(2, cfg.n_patches)
    steps = [model.encode_patches(patches[:, :5], caches, 0)]
    steps += [model.encode_patches(patches[:, t:t + 1], caches, t) for t in range(5, cfg.n_patches)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=RTOL)
    assert full.abs().mean() > 0.1  # features of substance, not a comparison of zeros


@torch.no_grad()
def test_byte_decoder_cache_equals_full_prefix_recompute():
    model, cfg = make_model()
    P = cfg.patch_size
    feature = torch.randn(3, cfg.n_embd)
    patch = torch.randint(0, 257, (3, P))
    for n_forced in (0, 3):  # a fresh patch, and one that starts with a prompt's partial last patch
        caches = model.byte_decoder.make_caches(3)
        logits = [model.byte_logits(feature, patch[:, :n_forced], caches, 0)[:, -1]]
        for i in range(n_forced, P - 1):
            logits.append(model.byte_logits(None, patch[:, i:i + 1], caches, i + 1)[:, -1])
        # what the seed's loop computes: the whole prefix [feature, bytes...] again for every byte
        recomputed = [model.byte_logits(feature, patch[:, :i])[:, -1] for i in range(n_forced, P)]
        torch.testing.assert_close(torch.stack(logits, 1), torch.stack(recomputed, 1), atol=ATOL, rtol=RTOL)
        # training's one pass over [feature, bytes 0..P-2] gives the same logits at those positions
        full = model.byte_logits(feature, patch[:, :-1])
        torch.testing.assert_close(full[:, n_forced:], torch.stack(recomputed, 1), atol=ATOL, rtol=RTOL)
    assert full.std() > 1.0


# ----------------------------------------------------------------------------------------------- generation


def prompts(tmp_path, P: int) -> list[GenerateRequest]:
    src = tmp_path / "tune.abc"
    src.write_bytes(b"K:C\nCDEF|")
    return [
        GenerateRequest(b"", sampling=GREEDY),
        GenerateRequest(b"hi", sampling=GREEDY, options={"ext": "py"}),
        GenerateRequest(bytes(range(65, 65 + P)), sampling=GREEDY),  # exactly one patch
        GenerateRequest(bytes(range(40, 40 + 2 * P + 3)), sampling=GREEDY),  # a partial last patch of 3
        GenerateRequest(sampling=GREEDY, options={"input": str(src), "target_ext": "mid"}),  # conversion
    ]


def test_greedy_eager_equals_reference_and_rows_agree(tmp_path):
    # no 256 under greedy: every output runs to the limit of patches (kept small: the reference loop is slow)
    model, cfg = make_model(stop_scale=0.0, patch_size=4, n_patches=8)
    for request in prompts(tmp_path, cfg.patch_size):
        patches, tail = bgpt_facts.make_prompt(cfg, request)
        expected_len = (cfg.n_patches - len(patches)) * cfg.patch_size - len(tail)
        ref = bgpt.generate(model, cfg, request, "eager-reference").outputs
        assert len(ref) == 1 and len(ref[0]) == expected_len
        eager = bgpt.generate(model, cfg, dataclasses.replace(request, batch_size=3), "eager")
        assert eager.outputs == ref * 3 and eager.n_new == 3 * expected_len and eager.unit == "byte"
        assert len(set(ref[0])) > 1  # not one byte repeated
    short = bgpt.generate(model, cfg, dataclasses.replace(request, max_new=5), "eager").outputs
    assert short == [ref[0][:5]]


def test_greedy_backends_agree_where_files_end(trained, tmp_path):
    model, cfg, _ = load_model(trained.ckpt)  # learned to end its files at a newline: outputs stop at 256
    lengths = []
    for request in prompts(tmp_path, cfg.patch_size):
        patches, tail = bgpt_facts.make_prompt(cfg, request)
        ref = bgpt.generate(model, cfg, request, "eager-reference").outputs
        assert bgpt.generate(model, cfg, dataclasses.replace(request, batch_size=2), "eager").outputs == ref * 2
        lengths.append((len(ref[0]), (cfg.n_patches - len(patches)) * cfg.patch_size - len(tail)))
    assert any(n < limit for n, limit in lengths), lengths  # a file that ended with 256 before the limit
    assert any(n > cfg.patch_size for n, _ in lengths), lengths  # and one that spans several patches


def test_sampling_is_reproducible_for_each_backend():
    model, cfg = make_model(std=None, patch_size=4)  # GPT-2 init: near-uniform bytes, so seeds give other files

    def run(backend, seed):
        sampling = SamplingConfig(top_k=200, top_p=0.95, temperature=0.9, seed=seed)
        return bgpt.generate(model, cfg, GenerateRequest(b"abc", 16, 2, sampling), backend).outputs

    for backend in bgpt.BACKENDS:
        first = run(backend, 1)
        assert run(backend, 1) == first
        assert run(backend, 2) != first
        assert first[0] != first[1]  # the two rows of a batch are different samples


def test_classifier_refuses_to_generate():
    model, cfg = make_model(task="classify", labels=("a", "b"))
    with pytest.raises(UserError, match="classifier"):
        bgpt.generate(model, cfg, GenerateRequest(b"x"), "eager")


# ----------------------------------------------------------------------------------------------- importer


@pytest.mark.parametrize("C, heads, head_options", [(32, 4, ["--n-head", "4", "--byte-n-head", "4"]),
                                                    (128, 2, [])])  # the default: hidden size / 64, as upstream
def test_import_official_weights_matches_transformers(tmp_path, C, heads, head_options):
    """Build the official code's module tree (github sanderwood/bgpt, utils.py) from transformers' GPT-2 classes,
    save it as the official training script does, import it through the CLI and compare logits."""
    transformers = pytest.importorskip("transformers")
    P, N = 8, 6

    class PatchLevelDecoder(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.patch_embedding = torch.nn.Linear(P * 257, config.n_embd)
            self.base = transformers.GPT2Model(config)

    class ByteLevelDecoder(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.base = transformers.GPT2LMHeadModel(config)

    class bGPTLMHeadModel(torch.nn.Module):
        def __init__(self, encoder_config, decoder_config):
            super().__init__()
            self.patch_level_decoder = PatchLevelDecoder(encoder_config)
            self.byte_level_decoder = ByteLevelDecoder(decoder_config)

    torch.manual_seed(0)
    NO_IDS = dict(bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is outside these vocabularies
    patch_config = transformers.GPT2Config(vocab_size=1, n_positions=N, n_embd=C, n_layer=2, n_head=heads, **NO_IDS)
    byte_config = transformers.GPT2Config(vocab_size=257, n_positions=P + 1, n_embd=C, n_layer=1, n_head=heads,
                                          **NO_IDS)
    official = bGPTLMHeadModel(patch_config, byte_config).eval()
    with torch.no_grad():
        for p in official.parameters():
            p.normal_(0.0, 0.3)
    state = official.state_dict()
    # older transformers releases also saved each layer's causal-mask buffers: the importer must skip them
    state["byte_level_decoder.base.transformer.h.0.attn.bias"] = torch.ones(1, 1, P + 1, P + 1).tril()
    state["byte_level_decoder.base.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    weights = tmp_path / "weights-bgpt.pth"
    torch.save({"model": state, "epoch": 3, "min_eval_loss": 1.0}, weights)

    ckpt = tmp_path / "imported"
    result = CliRunner().invoke(cli, ["import", "bgpt", str(weights), "-o", str(ckpt), *head_options])
    assert result.exit_code == 0, result.output
    model, cfg, _ = load_model(ckpt)
    assert (cfg.patch_size, cfg.n_patches, cfg.n_embd, cfg.n_layer, cfg.byte_n_layer) == (P, N, C, 2, 1)
    assert cfg.n_head == cfg.byte_n_head == heads

    patches = torch.randint(0, 257, (2, N, P))
    with torch.no_grad():
        # the official forward: one-hot patches -> Linear -> GPT2Model; for target patch j the byte decoder reads
        # [feature of patch j-1, embeddings of patch j's bytes]
        onehot = F.one_hot(patches, 257).float().reshape(2, N, P * 257)
        pld, bld = official.patch_level_decoder, official.byte_level_decoder
        feats = pld.base(inputs_embeds=pld.patch_embedding(onehot)).last_hidden_state
        targets = patches[:, 1:].reshape(-1, P)
        inputs = torch.cat([feats[:, :-1].reshape(-1, 1, C), bld.base.transformer.wte(targets)], 1)
        official_logits = bld.base(inputs_embeds=inputs).logits  # (M, P + 1, 257)

        ours = model.encode_patches(patches)
        our_logits = model.byte_logits(ours[:, :-1].reshape(-1, C), targets)
    torch.testing.assert_close(ours, feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_logits, official_logits, atol=1e-5, rtol=1e-5)
    assert official_logits.std() > 0.5  # logits of substance, not a comparison of near-zeros


# ----------------------------------------------------------------------------------------------- data


def write(folder, files: dict[str, bytes]):
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return str(folder)


def decode_pair(example: np.ndarray):
    """A conversion example of one-patch files: [BOS src, src, BOS dst, dst, EOS] -> (src ext, src, dst ext, dst)."""
    assert example.shape[0] == 5 and (example[4] == SPECIAL).all()
    return tuple(bgpt.patches_to_bytes(example[i:i + 1]) for i in range(4))


def test_conversion_pairs_both_ways(tmp_path):
    cfg = bgpt.Config(n_patches=8)
    folder = write(tmp_path, {
        "a.abc": b"A abc", "a.mid": b"A mid", "b.abc": b"B abc", "b.mid": b"B mid", "sub/e.abc": b"E abc",
        "sub/e.mid": b"E mid", "c.abc": b"C alone", "d.mid": b"D alone", "x.wav": b"X wav", "x.mp3": b"X mp3",
        "y.wav": b"Y wav", "y.mp3": b"Y mp3", "z.wav": b"Z alone",
    })

    def pairs(mode, eval_split=0.05):
        data = bgpt.make_data(cfg, folder, {"conversion": mode, "eval_split": eval_split})
        assert data.evals  # a tiny folder still holds a pair out for eval
        return sorted(decode_pair(e) for e in data.train + data.evals)

    assert pairs("abc->mid") == [(b"abc", s + b" abc", b"mid", s + b" mid") for s in (b"A", b"B", b"E")]
    assert pairs("mid->abc", eval_split=0.5) == [(b"mid", s + b" mid", b"abc", s + b" abc") for s in (b"A", b"B", b"E")]
    assert pairs("wav&mp3") == sorted([(b"wav", s + b" wav", b"mp3", s + b" mp3") for s in (b"X", b"Y")]
                                      + [(b"mp3", s + b" mp3", b"wav", s + b" wav") for s in (b"X", b"Y")])
    with pytest.raises(UserError, match="no file pairs"):
        bgpt.make_data(cfg, folder, {"conversion": "abc->xyz"})
    with pytest.raises(UserError, match="src->dst"):
        bgpt.make_data(cfg, folder, {"conversion": "abc"})


def test_builtin_cpu_states_start_from_random_registers():
    from bytedeploy.data import cpu_states
    from bytedeploy.data.files import cpu_state_records

    records = cpu_state_records(n_programs=40, seed=1)
    firsts = []
    for r in records:
        memory, states = cpu_states.parse_trace(r.data)
        first = states[0]
        firsts.append((first.acc, *first.registers))
        # the trace is the simulator's run of its program from that initial ACC and registers
        n = len(states) - 1
        assert r.data == cpu_states.run_program(memory[:4 * n], acc=first.acc, registers=first.registers)
    values = np.array(firsts)
    assert len({tuple(v) for v in values}) == 40 and values.min() < 30 and values.max() > 225  # uniform 0..255
    assert records[0].data == cpu_state_records(n_programs=1, seed=1)[0].data  # deterministic


def test_classification_data_from_file_names(tmp_path):
    names = {f"{label}_{i}.txt": f"{label} story {i}".encode() for label in ("Sports", "Business", "World")
             for i in range(3)}
    folder = write(tmp_path / "news", names)
    labels = bgpt.labels_from(folder)
    assert labels == ("Business", "Sports", "World")
    cfg = bgpt.Config(n_patches=8, task="classify", labels=labels)
    data = bgpt.make_data(cfg, folder, {"eval_split": 0.3})
    assert len(data.train) + len(data.evals) == 9 and data.unit == "file"
    for items, ids in ((data.train, data.train_labels), (data.evals, data.eval_labels)):
        for enc, label in zip(items, ids, strict=True):
            assert bgpt.patches_to_bytes(enc[1:]).split()[0].decode() == labels[label]
    with pytest.raises(UserError, match="at least two labels"):
        bgpt.labels_from(write(tmp_path / "one", {"Sports_1.txt": b"x", "Sports_2.txt": b"y"}))
    with pytest.raises(UserError, match="labels the model does not know"):
        bgpt.make_data(cfg, folder, {"eval_data": write(tmp_path / "new", {"Science_1.txt": b"x"})})


# ----------------------------------------------------------------------------------------------- CLI

FAST = ["--preset", "tiny", "--d-model", "32", "--layers", "1", "--heads", "2", "--set", "byte_n_layer=1",
        "--set", "byte_n_head=2", "--set", "patch_size=8", "--context", "12", "--batch-size", "8", "--lr", "3e-3",
        "--warmup", "2", "--eval-every", "0", "--ckpt-every", "0", "--eval-batches", "2", "--no-progress"]


@dataclasses.dataclass
class Trained:
    ckpt: str
    output: str


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """bytedeploy train bgpt --preset tiny (made smaller) on files of three words and a newline."""
    rng = np.random.default_rng(0)
    words = [b"alpha", b"gamma", b"delta", b"omega", b"sigma"]
    root = tmp_path_factory.mktemp("bgpt")
    folder = write(root / "data", {f"f{i}.txt": b" ".join(rng.choice(words, 3)) + b"\n" for i in range(16)})
    ckpt = str(root / "ckpt")
    result = CliRunner().invoke(cli, ["train", "bgpt", "--data", folder, "--steps", "40", *FAST, "-o", ckpt])
    assert result.exit_code == 0, result.output
    return Trained(ckpt, result.output)


def test_cli_train_generate_eval(trained, tmp_path):
    pattern = r"eval bits per byte: ([\d.]+) at step 0 -> ([\d.]+) at step 40"
    first, last = map(float, re.search(pattern, trained.output).groups())
    assert last < first - 2.0  # it learned
    _, cfg, _ = load_model(trained.ckpt)
    assert (cfg.patch_size, cfg.n_patches, cfg.n_embd, cfg.n_layer, cfg.n_head) == (8, 12, 32, 1, 2)

    runner = CliRunner()
    samples = []
    for backend in bgpt.BACKENDS:
        out = tmp_path / f"{backend}.txt"
        result = runner.invoke(cli, ["generate", trained.ckpt, "--prompt", "alpha ", "--temperature", "0",
                                     "--max-new", "60", "--backend", backend, "-o", str(out)])
        assert result.exit_code == 0, result.output
        samples.append(out.read_bytes())
    assert samples[0] == samples[1] and 0 < len(samples[0]) <= 60

    result = runner.invoke(cli, ["eval", trained.ckpt, "--batches", "2", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    bits = float(re.search(r"= ([\d.]+) bits per byte", result.output).group(1))
    assert bits == pytest.approx(last, abs=2e-4)  # the saved model and its eval split round-trip


def test_cli_classify_train_and_eval_accuracy(tmp_path):
    rng = np.random.default_rng(1)
    topics = {"Business": b"$%&", "Sports": b"0123", "World": b"xyz"}
    files = {f"{label}_{i}.txt": bytes(rng.choice(list(alphabet), 20).tolist()) for label, alphabet in topics.items()
             for i in range(4)}
    folder = write(tmp_path / "news", files)
    ckpt = tmp_path / "clf"
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "bgpt", "--task", "classify", "--data", folder, "--eval-split", "0.3",
                                 "--steps", "8", *FAST, "-o", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert "eval bits per file" in result.output
    result = runner.invoke(cli, ["eval", str(ckpt)])
    assert result.exit_code == 0, result.output
    correct, total = map(int, re.search(r"accuracy (\d+)/(\d+) = [\d.]+%", result.output).groups())

    # the same accuracy, file by file with no batching or padding
    model, cfg, _ = load_model(ckpt)
    assert cfg.labels == ("Business", "Sports", "World")
    evals = split_records(load_records(folder), 0.3)[1]
    expected = 0
    with torch.no_grad():
        for record in evals:
            x = torch.from_numpy(bgpt.encode_file(record.data, record.ext, cfg, truncate=True))[None]
            logits = model.classify_logits(model.encode_patches(x), torch.ones(x.shape[:2]))
            expected += int(cfg.labels[int(logits.argmax())] == label_of(record))
    assert (correct, total) == (expected, len(evals)) and total > 0

    result = runner.invoke(cli, ["eval", str(ckpt), "--data", folder, "--eval-split", "1.0"])  # every file
    assert result.exit_code == 0, result.output
    assert re.search(r"accuracy \d+/12 = ", result.output)
