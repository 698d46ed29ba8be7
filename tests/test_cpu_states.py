"""bGPT's CPU-state simulator: opcode semantics, trace layout, generate/translate/evaluate, and the CLI."""

import numpy as np
import pytest
from click.testing import CliRunner

from bytedeploy.data import cpu_states as cs
from bytedeploy.data.cpu_states import OP, CPUState, TraceError

MEM, S = 1024, 16  # default memory size and state size
A, B, C, J = 1, 2, 3, 10  # register operand bytes


def run_one(instruction, acc=0, regs=None):
    regs = tuple(regs) if regs is not None else (0,) * 10
    out = cs.execute(CPUState(5, acc, (0, 0, 0, 0), regs), instruction)
    assert (out.pc, out.ir) == (5, (0, 0, 0, 0))  # execute touches only ACC and the registers
    return out.acc, list(out.registers)


def regs_with(**values):
    regs = [0] * 10
    for name, v in values.items():
        regs[ord(name) - ord("A")] = v
    return regs


# (instruction, ACC in, registers in, ACC out, registers out)
CASES = {
    "HLT": ((OP["HLT"], 0, 0, 0), 9, regs_with(A=3), 9, regs_with(A=3)),
    "CLR acc": ((OP["CLR"], 0, 0, 0), 9, regs_with(A=3), 0, regs_with(A=3)),
    "CLR reg": ((OP["CLR"], A, 0, 0), 9, regs_with(A=3), 9, regs_with()),
    "INC acc": ((OP["INC"], 0, 0, 0), 41, regs_with(), 42, regs_with()),
    "INC saturates at 255": ((OP["INC"], 0, 0, 0), 255, regs_with(), 255, regs_with()),
    "INC reg saturates": ((OP["INC"], J, 0, 0), 0, regs_with(J=255), 0, regs_with(J=255)),
    "DEC reg": ((OP["DEC"], B, 0, 0), 0, regs_with(B=10), 0, regs_with(B=9)),
    "DEC saturates at 0": ((OP["DEC"], 0, 0, 0), 0, regs_with(), 0, regs_with()),
    "SHL drops the top bit": ((OP["SHL"], 0, 0, 0), 0b1000_0011, regs_with(), 0b0000_0110, regs_with()),
    "SHR reg": ((OP["SHR"], A, 0, 0), 0, regs_with(A=0b1000_0011), 0, regs_with(A=0b0100_0001)),
    "ROL rotates the top bit in": ((OP["ROL"], 0, 0, 0), 0b1000_0011, regs_with(), 0b0000_0111, regs_with()),
    "ROR rotates the low bit in": ((OP["ROR"], C, 0, 0), 0, regs_with(C=0b1000_0011), 0, regs_with(C=0b1100_0001)),
    "NOT acc": ((OP["NOT"], 0, 0, 0), 0b1010_0101, regs_with(), 0b0101_1010, regs_with()),
    "NOT reg": ((OP["NOT"], A, 0, 0), 0, regs_with(A=0), 0, regs_with(A=255)),
    "PUSH copies a register to ACC": ((OP["PUSH"], B, 0, 0), 1, regs_with(B=77), 77, regs_with(B=77)),
    "POP copies ACC to a register": ((OP["POP"], C, 0, 0), 66, regs_with(C=1), 66, regs_with(C=66)),
    "LOADI": ((OP["LOADI"], 200, 0, 0), 3, regs_with(), 200, regs_with()),
    "SWAP acc": ((OP["SWAP"], A, 0, 0), 5, regs_with(A=8), 8, regs_with(A=5)),
    "SWAP regs": ((OP["SWAP"], A, B, 0), 5, regs_with(A=8, B=9), 5, regs_with(A=9, B=8)),
    "ADD acc": ((OP["ADD"], A, 0, 0), 5, regs_with(A=8), 13, regs_with(A=8)),
    "ADD acc saturates": ((OP["ADD"], A, 0, 0), 200, regs_with(A=100), 255, regs_with(A=100)),
    "ADD 2": ((OP["ADD"], A, B, 0), 0, regs_with(A=8, B=9), 0, regs_with(A=17, B=9)),
    "ADD 3": ((OP["ADD"], A, B, C), 0, regs_with(A=8, B=9), 0, regs_with(A=8, B=9, C=17)),
    "SUB acc saturates at 0": ((OP["SUB"], A, 0, 0), 5, regs_with(A=8), 0, regs_with(A=8)),
    "SUB 2": ((OP["SUB"], A, B, 0), 0, regs_with(A=9, B=4), 0, regs_with(A=5, B=4)),
    "SUB 3 saturates": ((OP["SUB"], A, B, C), 0, regs_with(A=4, B=9, C=7), 0, regs_with(A=4, B=9)),
    "MUL acc": ((OP["MUL"], A, 0, 0), 6, regs_with(A=7), 42, regs_with(A=7)),
    "MUL 3 saturates": ((OP["MUL"], A, B, C), 0, regs_with(A=16, B=16), 0, regs_with(A=16, B=16, C=255)),
    "DIV acc floors": ((OP["DIV"], A, 0, 0), 17, regs_with(A=5), 3, regs_with(A=5)),
    "DIV acc by 0": ((OP["DIV"], A, 0, 0), 17, regs_with(), 255, regs_with()),
    "DIV 2 by 0": ((OP["DIV"], A, B, 0), 0, regs_with(A=7), 0, regs_with(A=255)),
    "DIV 3": ((OP["DIV"], A, B, C), 0, regs_with(A=200, B=7), 0, regs_with(A=200, B=7, C=28)),
    "DIV 3 by 0": ((OP["DIV"], A, B, C), 0, regs_with(A=200), 0, regs_with(A=200, C=255)),
    "AND acc": ((OP["AND"], A, 0, 0), 0b1100, regs_with(A=0b1010), 0b1000, regs_with(A=0b1010)),
    "OR 2": ((OP["OR"], A, B, 0), 0, regs_with(A=0b1100, B=0b1010), 0, regs_with(A=0b1110, B=0b1010)),
    "XOR 3": ((OP["XOR"], A, B, J), 0, regs_with(A=0b1100, B=0b1010), 0, regs_with(A=0b1100, B=0b1010, J=0b0110)),
    "MOV": ((OP["MOV"], A, J, 0), 0, regs_with(A=1, J=99), 0, regs_with(A=99, J=99)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_opcode_semantics(name):
    instruction, acc, regs, want_acc, want_regs = CASES[name]
    assert run_one(instruction, acc, regs) == (want_acc, want_regs)


def test_every_opcode_is_covered():
    assert {cs.OPCODES[case[0][0]] for case in CASES.values()} == set(cs.OPCODES)


@pytest.mark.parametrize("instruction", [
    (21, 0, 0, 0),          # bad opcode
    (OP["PUSH"], 0, 0, 0),  # PUSH needs a register
    (OP["ADD"], 11, 0, 0),  # only 10 registers
    (OP["ADD"], A, 0, C),   # operands must be a prefix
    (OP["MOV"], A, 0, 0),   # MOV needs two registers
    (OP["HLT"], A, 0, 0),   # HLT takes none
    (OP["LOADI"], 5, A, 0),
])
def test_invalid_instructions_are_rejected(instruction):
    with pytest.raises(TraceError):
        cs.execute(CPUState(0, 0, (0, 0, 0, 0), (0,) * 10), instruction)


def test_trace_layout_records_each_instruction_before_it_runs():
    program = bytes([OP["LOADI"], 7, 0, 0, OP["POP"], A, 0, 0, OP["ADD"], A, A, B, OP["HLT"], 0, 0, 0])
    trace = cs.run_program(program, acc=1, registers=list(range(10, 20)))
    assert len(trace) == MEM + S * 5  # first state + 4 executed instructions (HLT included)
    assert trace[:len(program)] == program and trace[len(program):MEM] == bytes(MEM - len(program))
    states = [CPUState.from_bytes(trace[MEM + k * S:MEM + (k + 1) * S]) for k in range(5)]
    assert states[0] == CPUState(0, 1, (0, 0, 0, 0), tuple(range(10, 20)))
    assert (states[1].pc, states[1].acc, states[1].ir) == (1, 1, (OP["LOADI"], 7, 0, 0))  # fetched, not yet run
    assert (states[2].pc, states[2].acc, states[2].registers[0]) == (2, 7, 10)
    assert (states[3].pc, states[3].registers[0]) == (3, 7)
    assert (states[4].pc, states[4].ir, states[4].registers[:2]) == (4, (0, 0, 0, 0), (7, 14))
    # step() is exactly one recorded cycle
    for k in range(4):
        assert cs.step(states[k], program[4 * k:4 * k + 4]) == states[k + 1]


def test_pc_stops_at_the_last_memory_word():
    program = bytes([OP["INC"], 0, 0, 0] * 3 + [OP["HLT"], 0, 0, 0])  # fills a 16-byte memory
    trace = cs.run_program(program, memory_size=16)
    pcs = [trace[16 + k * S] for k in range(5)]
    assert pcs == [0, 1, 2, 3, 3]
    with pytest.raises(TraceError, match="never halts"):
        cs.run_program(bytes([OP["INC"], 0, 0, 0] * 4), memory_size=16)


def test_random_programs_are_valid_and_end_with_hlt():
    rng = np.random.default_rng(0)
    assert cs.random_program(rng, 1) == bytes(4)
    for n in (2, 50, 255):
        program = cs.random_program(rng, n)
        assert len(program) == 4 * n and program[-4:] == bytes(4)
        words = [program[i:i + 4] for i in range(0, len(program), 4)]
        for w in words:
            cs.check_instruction(w)
        assert all(w[0] != OP["HLT"] for w in words[:-1])
        assert all(a <= 10 for w in words if w[0] != OP["LOADI"] for a in w[1:])


@pytest.fixture
def dataset(tmp_path):
    out = tmp_path / "cpu"
    paths = cs.generate(out, 6, 3, min_program=1, max_program=40, seed=3, progress=False)
    return out, paths


def test_generate_translate_and_evaluate_true_traces(dataset):
    out, paths = dataset
    assert [p.relative_to(out).as_posix() for p in paths] == \
        [f"train/cpu_{i}.bin" for i in range(6)] + [f"test/cpu_{i}.bin" for i in range(3)]
    for p in paths:
        trace = p.read_bytes()
        memory, states = cs.parse_trace(trace)
        n_program = len(cs.program_words(memory))
        assert len(states) == n_program + 1 and states[-1].ir == (0, 0, 0, 0)
        assert cs.run_program(memory[:4 * n_program], acc=states[0].acc, registers=states[0].registers) == trace
        text = cs.translate(trace).splitlines()
        assert len(text) == 2 + n_program + len(states)
        assert text[n_program].endswith("HLT") and "PC=" in text[-1] and "J=" in text[-1]
        assert cs.evaluate(trace, trace) == (len(states) - 1, len(states) - 1)
    assert cs.evaluate_dir(out, out) == 1.0


def test_one_flipped_byte_is_one_wrong_state(dataset, tmp_path):
    out, paths = dataset
    true = paths[0].read_bytes()
    n = (len(true) - MEM) // S - 1
    for offset in (0, 1, 7, S - 1):  # PC, ACC, IR, last register of the last state
        pred = bytearray(true)
        pred[len(true) - S + offset] ^= 0x01
        assert cs.evaluate(bytes(pred), true) == (n - 1, n)
    pred_dir = tmp_path / "pred"
    total = 0
    for p in paths:
        target = pred_dir / p.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = bytearray(p.read_bytes())
        if p == paths[0]:
            data[MEM + S + 1] ^= 0x80  # ACC of the first predicted state
        target.write_bytes(bytes(data))
        total += (len(data) - MEM) // S - 1
    assert cs.evaluate_dir(pred_dir, out) == pytest.approx((total - 1) / total)


def test_truncated_and_extra_predictions_count_as_wrong():
    program = cs.random_program(np.random.default_rng(1), 10)
    true = cs.run_program(program)
    n = 10
    assert cs.evaluate(true[:-2 * S], true) == (n - 2, n)
    assert cs.evaluate(true[:-S // 2], true) == (n - 1, n)  # a partial last state is wrong
    assert cs.evaluate(true[:MEM + S], true) == (0, n)  # the prompt only
    assert cs.evaluate(true + true[-S:], true) == (n, n + 1)  # past HLT
    with pytest.raises(TraceError, match="does not start with"):
        cs.evaluate(b"\x01" + true[1:], true)


def test_missing_prediction_file_counts_all_its_states_wrong(dataset, tmp_path):
    out, paths = dataset
    pred = tmp_path / "pred"
    (pred / "train").mkdir(parents=True)
    kept = paths[0]
    (pred / "train" / kept.name).write_bytes(kept.read_bytes())
    states = {p: (len(p.read_bytes()) - MEM) // S - 1 for p in paths}
    assert cs.evaluate_dir(pred, out) == pytest.approx(states[kept] / sum(states.values()))


def test_generate_is_deterministic(tmp_path):
    a = cs.generate(tmp_path / "a", 4, 2, max_program=30, seed=7, progress=False)
    b = cs.generate(tmp_path / "b", 4, 5, max_program=30, seed=7, progress=False)
    c = cs.generate(tmp_path / "c", 4, 2, max_program=30, seed=8, progress=False)
    read = lambda paths: [p.read_bytes() for p in paths]
    assert read(a) == read(b)[:4] + read(b)[4:6]  # train does not depend on num_test
    assert read(a) != read(c)


def test_generate_refuses_a_non_empty_folder(dataset):
    out, _ = dataset
    with pytest.raises(TraceError, match="not empty"):
        cs.generate(out, 1, 1, progress=False)
    paths = cs.generate(out, 2, 0, max_program=5, overwrite=True, progress=False)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["cpu_0.bin", "cpu_1.bin"] == [p.name for p in paths]
    assert list((out / "test").iterdir()) == []


def test_cli_generate_translate_evaluate(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cpu"
    args = ["generate", "-o", str(out), "--num-train", "3", "--num-test", "2", "--max-program", "12", "--seed", "1"]
    r = runner.invoke(cs.cpu_states_cli, args)
    assert r.exit_code == 0, r.output
    assert "wrote 3 train and 2 test traces" in r.output
    assert len(list((out / "train").glob("*.bin"))) == 3 and len(list((out / "test").glob("*.bin"))) == 2

    r = runner.invoke(cs.cpu_states_cli, args)
    assert r.exit_code == 1 and "not empty" in r.output and "Traceback" not in r.output
    assert runner.invoke(cs.cpu_states_cli, args + ["--force"]).exit_code == 0

    trace_path = out / "test" / "cpu_0.bin"
    r = runner.invoke(cs.cpu_states_cli, ["translate", str(trace_path)])
    assert r.exit_code == 0, r.output
    assert r.output == cs.translate(trace_path.read_bytes()) + "\n"

    r = runner.invoke(cs.cpu_states_cli, ["evaluate", "--pred", str(out), "--true", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("accuracy: 100.00% (") and "5 files" in r.output


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.bin", "not found"),
    (lambda d: _write(d / "short.bin", bytes(MEM + S + 3)), "not a CPU trace"),
    (lambda d: _write(d / "badop.bin", bytes([99, 0, 0, 0]) + bytes(MEM - 4 + 2 * S)), "bad opcode 99"),
])
def test_cli_bad_input_is_a_one_line_error(tmp_path, make, message):
    r = CliRunner().invoke(cs.cpu_states_cli, ["translate", str(make(tmp_path))])
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and message in r.output
    assert len(r.output.strip().splitlines()) == 1


def _write(path, data):
    path.write_bytes(data)
    return path


def test_cli_evaluate_bad_folders(tmp_path):
    r = CliRunner().invoke(cs.cpu_states_cli, ["evaluate", "--pred", str(tmp_path / "x"), "--true", str(tmp_path)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "not found" in r.output
