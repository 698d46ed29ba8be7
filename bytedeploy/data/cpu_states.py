"""bGPT's CPU-state simulator (arXiv 2402.19155), re-implemented from the official repo's ``cpu-simulation.py``.

A toy 8-bit CPU: a memory of ``memory_size`` (1024) bytes holds 4-byte instructions ``(opcode, addr1, addr2, addr3)``
from address 0; the rest of the memory is zero (a zero word is ``HLT``). The register state is
``[PC, ACC, IR0, IR1, IR2, IR3, A, B, ..., J]``: 6 + ``num_registers`` bytes, 16 with the default 10 registers.

Operands. An operand byte ``0`` means "no operand" (the instruction then works on ACC); register A..J (index 0..9)
is the operand byte 1..10 (index + 1), as in the official ``map_register``. LOADI's ``addr1`` is an immediate
0..255. A valid instruction has its non-zero operands first (``ADD A 0 C`` is not valid) in one of the forms below,
with unused operand bytes 0; the random programs draw only valid forms.

Semantics (r1, r2, r3 = the registers named by addr1..addr3; ``sat(x)`` = clip to 0..255; all values are bytes):

    op  mnemonic  form          effect
    --  --------  ------------  ------------------------------------------------------------------
     0  HLT       HLT           stop (no change to ACC or registers)
     1  CLR       CLR | CLR r1  x = 0                          (x = ACC without an operand, else r1;
     2  INC       INC | INC r1  x = sat(x + 1)                  the same for every op from CLR to NOT)
     3  DEC       DEC | DEC r1  x = sat(x - 1)
     4  SHL       SHL | SHL r1  x = (x << 1) & 0xFF             (top bit dropped, no saturation)
     5  SHR       SHR | SHR r1  x = x >> 1                      (logical)
     6  ROL       ROL | ROL r1  x = ((x << 1) & 0xFF) | (x >> 7) (rotate within 8 bits)
     7  ROR       ROR | ROR r1  x = (x >> 1) | ((x << 7) & 0xFF) (rotate within 8 bits)
     8  NOT       NOT | NOT r1  x = ~x & 0xFF
     9  PUSH      PUSH r1       ACC = r1                        (ACC is the one-slot "stack")
    10  POP       POP r1        r1 = ACC                        (ACC keeps its value)
    11  LOADI     LOADI imm     ACC = imm                       (imm = addr1, 0..255)
    12  SWAP      SWAP r1       ACC, r1 = r1, ACC
                  SWAP r1 r2    r1, r2 = r2, r1
    13  ADD       ADD r1        ACC = sat(ACC + r1)
                  ADD r1 r2     r1  = sat(r1 + r2)
                  ADD r1 r2 r3  r3  = sat(r1 + r2)
    14  SUB       (as ADD)      sat(a - b): ACC - r1, r1 - r2
    15  MUL       (as ADD)      sat(a * b)
    16  DIV       (as ADD)      a // b, and 255 when b == 0 (b = r1 for the one-operand form, else r2)
    17  AND       (as ADD)      a & b
    18  OR        (as ADD)      a | b
    19  XOR       (as ADD)      a ^ b
    20  MOV       MOV r1 r2     r1 = r2

Per instruction (the official fetch / record / execute loop): the CPU fetches the word at PC into IR and sets
``PC = min(PC + 1, memory_size // 4 - 1)``, records the 16-byte state, then executes IR; it stops after recording
the state whose IR is HLT. A recorded state therefore shows the instruction just fetched in IR and the registers
*before* it runs (its effect appears in the next state). ``step(state, instruction)`` is exactly one such cycle:
it executes the IR held in ``state`` (the all-zero IR of the first state is HLT, a no-op) and fetches
``instruction``.

Trace (one ``.bin`` file): the memory (``memory_size`` bytes), the first state (PC 0, IR 0 0 0 0, ACC and registers
as initialised), then one state per executed instruction, HLT included: ``memory_size + 16 * (1 + n)`` bytes for a
program of n instructions.

Random programs (as the official ``random_program``): n - 1 instructions, each a mnemonic drawn uniformly from the
20 non-HLT ones, then a form uniformly from that mnemonic's forms (CLR..NOT: 0 or 1 operands; PUSH, POP: 1; SWAP:
1 or 2; ADD..XOR: 1, 2 or 3; MOV: 2), registers uniform over A..J and LOADI immediates uniform over 0..255;
followed by HLT. ``generate`` draws n uniformly from min_program..max_program (1..255) and, as the official
``random_init``, ACC and every register uniformly from 0..255.

Differences from the official script: numpy's ``Generator`` instead of Python's ``random`` (so the files differ
from the official ones for the same seed), files named ``cpu_{i}.bin`` instead of an md5 of the program, and
accuracy counted per state (a whole 16-byte state must match) instead of per byte.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from bytedeploy.errors import UserError

OPCODES = ("HLT", "CLR", "INC", "DEC", "SHL", "SHR", "ROL", "ROR", "NOT", "PUSH", "POP", "LOADI",
           "SWAP", "ADD", "SUB", "MUL", "DIV", "AND", "OR", "XOR", "MOV")
OP = {name: i for i, name in enumerate(OPCODES)}

# Allowed numbers of register operands per opcode (the official addr_num_instruction; HLT takes none).
FORMS: dict[int, tuple[int, ...]] = {OP["HLT"]: (0,)}
FORMS.update({OP[n]: (0, 1) for n in ("CLR", "INC", "DEC", "SHL", "SHR", "ROL", "ROR", "NOT")})
FORMS.update({OP["PUSH"]: (1,), OP["POP"]: (1,), OP["LOADI"]: (1,), OP["SWAP"]: (1, 2), OP["MOV"]: (2,)})
FORMS.update({OP[n]: (1, 2, 3) for n in ("ADD", "SUB", "MUL", "DIV", "AND", "OR", "XOR")})

UNARY = {
    OP["CLR"]: lambda x: 0,
    OP["INC"]: lambda x: min(x + 1, 255),
    OP["DEC"]: lambda x: max(x - 1, 0),
    OP["SHL"]: lambda x: (x << 1) & 0xFF,
    OP["SHR"]: lambda x: x >> 1,
    OP["ROL"]: lambda x: ((x << 1) & 0xFF) | (x >> 7),
    OP["ROR"]: lambda x: (x >> 1) | ((x << 7) & 0xFF),
    OP["NOT"]: lambda x: ~x & 0xFF,
}
BINARY = {
    OP["ADD"]: lambda a, b: min(a + b, 255),
    OP["SUB"]: lambda a, b: max(a - b, 0),
    OP["MUL"]: lambda a, b: min(a * b, 255),
    OP["DIV"]: lambda a, b: 255 if b == 0 else a // b,
    OP["AND"]: lambda a, b: a & b,
    OP["OR"]: lambda a, b: a | b,
    OP["XOR"]: lambda a, b: a ^ b,
}

MEMORY_SIZE = 1024
NUM_REGISTERS = 10
MAX_REGISTERS = 26  # registers are named by letters A..Z


class TraceError(UserError, ValueError):
    """An invalid program, trace, or simulator setting (a one-line message)."""


@dataclass(frozen=True)
class CPUState:
    pc: int
    acc: int
    ir: tuple[int, int, int, int]
    registers: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return bytes((self.pc, self.acc, *self.ir, *self.registers))

    @classmethod
    def from_bytes(cls, data: bytes) -> CPUState:
        return cls(data[0], data[1], tuple(data[2:6]), tuple(data[6:]))


def state_size(num_registers: int = NUM_REGISTERS) -> int:
    return 6 + num_registers


def check_config(memory_size: int, num_registers: int) -> None:
    if not 4 <= memory_size <= 1024 or memory_size % 4:
        raise TraceError(f"memory size must be a multiple of 4 in 4..1024 (PC is one byte), got {memory_size}")
    if not 1 <= num_registers <= MAX_REGISTERS:
        raise TraceError(f"number of registers must be in 1..{MAX_REGISTERS}, got {num_registers}")


def check_instruction(instruction: Sequence[int], num_registers: int = NUM_REGISTERS) -> None:
    """Raise TraceError unless ``instruction`` is one of the valid forms in the module docstring."""
    op, a1, a2, a3 = instruction
    if op >= len(OPCODES):
        raise TraceError(f"bad opcode {op} in instruction {tuple(instruction)} (valid: 0..{len(OPCODES) - 1})")
    if op == OP["LOADI"]:
        if a2 or a3:
            raise TraceError(f"LOADI takes one immediate, got operands {tuple(instruction[1:])}")
        return
    n = 3 if a3 else 2 if a2 else 1 if a1 else 0
    if 0 in (a1, a2, a3)[:n] or n not in FORMS[op]:
        raise TraceError(f"invalid operands for {OPCODES[op]}: {tuple(instruction[1:])}")
    if any(a > num_registers for a in (a1, a2, a3)):
        raise TraceError(f"register operand out of range in {tuple(instruction)} (valid: 1..{num_registers})")


def disassemble(instruction: Sequence[int]) -> str:
    """(13, 1, 2, 3) -> 'ADD A B C'; (11, 7, 0, 0) -> 'LOADI 7' (the official back_translate)."""
    op, a1, a2, a3 = instruction
    if op == OP["LOADI"]:
        return f"LOADI {a1}"
    return " ".join([OPCODES[op]] + [chr(ord("A") + a - 1) for a in (a1, a2, a3) if a])


def execute(state: CPUState, instruction: Sequence[int]) -> CPUState:
    """The effect of one instruction on ACC and the registers (PC and IR unchanged); see the module table."""
    check_instruction(instruction, len(state.registers))
    op, a1, a2, a3 = instruction
    acc, regs = state.acc, list(state.registers)
    if op == OP["HLT"]:
        return state
    if op in UNARY:
        if a1 == 0:
            acc = UNARY[op](acc)
        else:
            regs[a1 - 1] = UNARY[op](regs[a1 - 1])
    elif op == OP["PUSH"]:
        acc = regs[a1 - 1]
    elif op == OP["POP"]:
        regs[a1 - 1] = acc
    elif op == OP["LOADI"]:
        acc = a1
    elif op == OP["SWAP"]:
        if a2 == 0:
            acc, regs[a1 - 1] = regs[a1 - 1], acc
        else:
            regs[a1 - 1], regs[a2 - 1] = regs[a2 - 1], regs[a1 - 1]
    elif op in BINARY:
        if a2 == 0:
            acc = BINARY[op](acc, regs[a1 - 1])
        elif a3 == 0:
            regs[a1 - 1] = BINARY[op](regs[a1 - 1], regs[a2 - 1])
        else:
            regs[a3 - 1] = BINARY[op](regs[a1 - 1], regs[a2 - 1])
    else:  # MOV
        regs[a1 - 1] = regs[a2 - 1]
    return CPUState(state.pc, acc, state.ir, tuple(regs))


def step(state: CPUState, instruction: Sequence[int], memory_size: int = MEMORY_SIZE) -> CPUState:
    """One recorded cycle: execute the IR held in ``state``, then fetch ``instruction`` (the word at ``state.pc``)."""
    done = execute(state, state.ir)
    return CPUState(min(state.pc + 1, memory_size // 4 - 1), done.acc, tuple(instruction), done.registers)


def random_program(rng: np.random.Generator, n_instructions: int, num_registers: int = NUM_REGISTERS) -> bytes:
    """``n_instructions`` 4-byte instructions: n - 1 random valid ones, then HLT (see the module docstring)."""
    if n_instructions < 1:
        raise TraceError(f"a program needs at least 1 instruction (its HLT), got {n_instructions}")
    out = bytearray()
    for _ in range(n_instructions - 1):
        op = int(rng.integers(1, len(OPCODES)))
        if op == OP["LOADI"]:
            operands = [int(rng.integers(0, 256))]
        else:
            forms = FORMS[op]
            n = forms[int(rng.integers(len(forms)))]
            operands = [int(r) for r in rng.integers(1, num_registers + 1, size=n)]
        out += bytes([op, *operands, *[0] * (3 - len(operands))])
    out += bytes(4)  # HLT
    return bytes(out)


def run_program(program: bytes, memory_size: int = MEMORY_SIZE, num_registers: int = NUM_REGISTERS,
                acc: int = 0, registers: Sequence[int] | None = None) -> bytes:
    """Load ``program`` at address 0, run it from PC 0 with the given ACC and registers (zeros by default), and
    return its trace: memory + first state, then one state per executed instruction (HLT included)."""
    check_config(memory_size, num_registers)
    program = bytes(program)
    if not program or len(program) % 4 or len(program) > memory_size:
        raise TraceError(f"a program is 1..{memory_size // 4} 4-byte instructions; got {len(program)} bytes")
    for i in range(0, len(program), 4):
        check_instruction(program[i:i + 4], num_registers)
    memory = program + bytes(memory_size - len(program))
    if not any(memory[i] == OP["HLT"] for i in range(0, memory_size, 4)):
        raise TraceError("the program fills the memory without a HLT, so it never halts")
    registers = tuple(registers) if registers is not None else (0,) * num_registers
    if len(registers) != num_registers or not all(0 <= v <= 255 for v in (acc, *registers)):
        raise TraceError(f"ACC and the {num_registers} registers must be bytes 0..255")
    state = CPUState(0, acc, (0, 0, 0, 0), registers)
    out = bytearray(memory) + state.to_bytes()
    while True:
        instruction = memory[state.pc * 4:state.pc * 4 + 4]
        state = step(state, instruction, memory_size)
        out += state.to_bytes()
        if instruction[0] == OP["HLT"]:
            return bytes(out)


def parse_trace(trace: bytes, memory_size: int = MEMORY_SIZE,
                num_registers: int = NUM_REGISTERS) -> tuple[bytes, list[CPUState]]:
    """Split a trace into (memory, states), states[0] being the first state; TraceError if it is malformed
    (wrong length, or a bad instruction among the executed program words or in any IR)."""
    check_config(memory_size, num_registers)
    size = state_size(num_registers)
    if len(trace) < memory_size + size or (len(trace) - memory_size) % size:
        raise TraceError(f"not a CPU trace: {len(trace)} bytes is not {memory_size} memory bytes plus a whole "
                         f"number (>= 1) of {size}-byte states")
    memory = bytes(trace[:memory_size])
    for i in range(0, memory_size, 4):
        try:
            check_instruction(memory[i:i + 4], num_registers)
        except TraceError as e:
            raise TraceError(f"memory word {i // 4}: {e}") from None
        if memory[i] == OP["HLT"]:
            break  # words after the first HLT are never executed
    states = []
    for k, start in enumerate(range(memory_size, len(trace), size)):
        state = CPUState.from_bytes(trace[start:start + size])
        try:
            check_instruction(state.ir, num_registers)
        except TraceError as e:
            raise TraceError(f"state {k}: IR {e}") from None
        states.append(state)
    return memory, states


def program_words(memory: bytes) -> list[bytes]:
    """The program in memory: its words up to and including the first HLT."""
    words = []
    for i in range(0, len(memory), 4):
        words.append(memory[i:i + 4])
        if memory[i] == OP["HLT"]:
            break
    return words


def translate(trace: bytes, memory_size: int = MEMORY_SIZE, num_registers: int = NUM_REGISTERS) -> str:
    """A trace as text: one line per program instruction, then one line per state."""
    memory, states = parse_trace(trace, memory_size, num_registers)
    words = program_words(memory)
    lines = [f"program: {len(words)} instructions"]
    lines += [f"  {i:3d}  {disassemble(w)}" for i, w in enumerate(words)]
    lines.append(f"states: {len(states)} (the first, then one per executed instruction)")
    for k, s in enumerate(states):
        regs = " ".join(f"{chr(ord('A') + j)}={v:3d}" for j, v in enumerate(s.registers))
        lines.append(f"  {k:3d}  PC={s.pc:3d} ACC={s.acc:3d} IR={disassemble(s.ir):<12s} {regs}")
    return "\n".join(lines)


def evaluate(predicted: bytes, true: bytes, memory_size: int = MEMORY_SIZE,
             num_registers: int = NUM_REGISTERS) -> tuple[int, int]:
    """(states equal to the true ones, states counted), over the states after the first full state.

    The prediction must start with the true memory and first state (the prompt). Its states are compared with the
    true ones position by position; a missing state (a truncated prediction, a partial last state) and an extra one
    (past the true HLT) both count as wrong, so the count is max(true states, predicted states)."""
    _, true_states = parse_trace(true, memory_size, num_registers)
    header = memory_size + state_size(num_registers)
    if bytes(predicted[:header]) != bytes(true[:header][:len(predicted)]):
        raise TraceError("the prediction does not start with the true program and first state")
    size = state_size(num_registers)
    pred_body, true_body = bytes(predicted[header:]), bytes(true[header:])
    n_true, n_pred = len(true_states) - 1, math.ceil(len(pred_body) / size)
    if n_true == 0:
        raise TraceError("the true trace has no states after the first")
    correct = sum(pred_body[i * size:(i + 1) * size] == true_body[i * size:(i + 1) * size]
                  for i in range(min(n_true, n_pred)))
    return correct, max(n_true, n_pred)


def _evaluate_dir_counts(pred_dir, true_dir, memory_size: int = MEMORY_SIZE,
                         num_registers: int = NUM_REGISTERS) -> tuple[int, int, int, int]:
    """(correct states, states, true files, true files without a prediction)."""
    pred_dir, true_dir = Path(pred_dir), Path(true_dir)
    for name, d in (("prediction", pred_dir), ("true", true_dir)):
        if not d.is_dir():
            raise TraceError(f"{name} folder not found: {d}")
    true_files = sorted(p for p in true_dir.rglob("*.bin") if p.is_file())
    if not true_files:
        raise TraceError(f"no .bin traces under {true_dir}")
    correct = total = missing = 0
    for true_path in true_files:
        pred_path = pred_dir / true_path.relative_to(true_dir)
        if not pred_path.is_file():
            missing += 1
        true = true_path.read_bytes()
        try:
            parse_trace(true, memory_size, num_registers)
        except TraceError as e:
            raise TraceError(f"{true_path}: {e}") from None
        try:  # the true trace is valid, so an error here is the prediction's
            c, n = evaluate(pred_path.read_bytes() if pred_path.is_file() else b"", true, memory_size, num_registers)
        except TraceError as e:
            raise TraceError(f"{pred_path}: {e}") from None
        correct, total = correct + c, total + n
    if missing == len(true_files):
        raise TraceError(f"no file under {pred_dir} matches a trace under {true_dir} by relative path")
    return correct, total, len(true_files), missing


def evaluate_dir(pred_dir, true_dir, memory_size: int = MEMORY_SIZE, num_registers: int = NUM_REGISTERS) -> float:
    """Accuracy over every ``*.bin`` under ``true_dir``, paired with ``pred_dir`` by relative path (a trace
    without a prediction counts all its states wrong)."""
    correct, total, _, _ = _evaluate_dir_counts(pred_dir, true_dir, memory_size, num_registers)
    return correct / total


def generate(out_dir, num_train: int, num_test: int, min_program: int = 1, max_program: int = 255, seed: int = 0,
             memory_size: int = MEMORY_SIZE, num_registers: int = NUM_REGISTERS, overwrite: bool = False,
             progress: bool = True) -> list[Path]:
    """Write ``out_dir/train/cpu_{i}.bin`` and ``out_dir/test/cpu_{i}.bin``; the same seed gives the same files.

    Train and test draw from two independent streams of ``seed``, so the train files do not depend on num_test.
    A non-empty ``out_dir`` is refused unless ``overwrite``, which first deletes its old train/test cpu_*.bin."""
    check_config(memory_size, num_registers)
    if num_train < 0 or num_test < 0:
        raise TraceError("the numbers of train and test programs must be >= 0")
    if not 1 <= min_program <= max_program <= memory_size // 4:
        raise TraceError(f"program lengths need 1 <= min ({min_program}) <= max ({max_program}) <= "
                         f"{memory_size // 4} (instructions that fit in {memory_size} bytes)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TraceError(f"output path is not a folder: {out_dir}")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise TraceError(f"output folder is not empty: {out_dir} (use --force to overwrite)")
        for split in ("train", "test"):
            for old in (out_dir / split).glob("cpu_*.bin"):
                old.unlink()
    paths = []
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)]
    with tqdm(total=num_train + num_test, desc="cpu states", unit="trace", disable=not progress) as bar:
        for split, count, rng in (("train", num_train, rngs[0]), ("test", num_test, rngs[1])):
            (out_dir / split).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                acc = int(rng.integers(0, 256))
                registers = [int(v) for v in rng.integers(0, 256, size=num_registers)]
                program = random_program(rng, int(rng.integers(min_program, max_program + 1)), num_registers)
                path = out_dir / split / f"cpu_{i}.bin"
                path.write_bytes(run_program(program, memory_size, num_registers, acc, registers))
                paths.append(path)
                bar.update()
    return paths


# ---------------------------------------------------------------------------------------------- command line

def _config_options(f):
    f = click.option("--num-registers", type=int, default=NUM_REGISTERS, show_default=True,
                     help="General-purpose registers A, B, ... (state = 6 + this many bytes).")(f)
    return click.option("--memory-size", type=int, default=MEMORY_SIZE, show_default=True,
                        help="Memory bytes holding the program (a multiple of 4, at most 1024).")(f)


def _click_errors(fn):
    """Run fn, turning bad input into click's one-line 'Error: ...' (exit status 1)."""
    try:
        return fn()
    except (UserError, OSError) as e:
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


@click.group("cpu-states")
def cpu_states_cli():
    """bGPT's toy-CPU simulator: generate program traces, print one as text, score predicted traces."""


@cpu_states_cli.command("generate")
@click.option("--out", "-o", "out", type=click.Path(), required=True, help="Output folder (gets train/ and test/).")
@click.option("--num-train", type=int, default=210, show_default=True, help="Number of training traces.")
@click.option("--num-test", type=int, default=21, show_default=True, help="Number of test traces.")
@click.option("--min-program", type=int, default=1, show_default=True,
              help="Fewest instructions in a program (its final HLT included).")
@click.option("--max-program", type=int, default=255, show_default=True,
              help="Most instructions in a program (its final HLT included).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same seed gives the same files.")
@_config_options
@click.option("--force", is_flag=True, help="Write into a non-empty output folder, deleting its old traces.")
def generate_command(out, num_train, num_test, min_program, max_program, seed, memory_size, num_registers, force):
    """Write random program traces to OUT/train/cpu_{i}.bin and OUT/test/cpu_{i}.bin."""
    paths = _click_errors(lambda: generate(out, num_train, num_test, min_program, max_program, seed,
                                           memory_size, num_registers, overwrite=force))
    click.echo(f"wrote {num_train} train and {num_test} test traces ({len(paths)} files) to {out}")


@cpu_states_cli.command("translate")
@click.argument("path", type=click.Path())
@_config_options
def translate_command(path, memory_size, num_registers):
    """Print the trace at PATH as text: its program, then one line per state."""
    def run():
        p = Path(path)
        if not p.is_file():
            raise TraceError(f"trace file not found: {p}")
        try:
            return translate(p.read_bytes(), memory_size, num_registers)
        except TraceError as e:
            raise TraceError(f"{p}: {e}") from None

    click.echo(_click_errors(run))


@cpu_states_cli.command("evaluate")
@click.option("--pred", type=click.Path(), required=True, help="Folder of predicted traces.")
@click.option("--true", "true_dir", type=click.Path(), required=True,
              help="Folder of simulated traces; files are paired by relative path.")
@_config_options
def evaluate_command(pred, true_dir, memory_size, num_registers):
    """Print the fraction of predicted states (after the first) equal to the simulated ones."""
    correct, total, files, missing = _click_errors(
        lambda: _evaluate_dir_counts(pred, true_dir, memory_size, num_registers))
    note = f"; {missing} without a prediction" if missing else ""
    click.echo(f"accuracy: {100 * correct / total:.2f}% ({correct}/{total} states, {files} files{note})")
