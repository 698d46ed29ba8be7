"""`bytedeploy pack` and `unpack`: the archive's members, modes, checksums and requirements per target; unpacking
refuses members outside the target folder, links and edited files; and the unpacked pack's `run` script installs
the packed wheel into a torch-free virtual environment (offline) and generates what the full install generates."""

import hashlib
import io
import os
import subprocess
import tarfile
import zipfile

import pytest
from click.testing import CliRunner

from bytedeploy.cli import cli
from bytedeploy.exporters.bundle import load_bundle
from bytedeploy.runtimes import pack as pk
from bytedeploy.runtimes import targets as tg

PROMPT = ["--prompt", "def ", "--max-new", "24", "--temperature", "0"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, words):
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("Error: ") and words in result.output, result.output


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    """The tiny BitNet bundle: bytes in, bytes out."""
    return load_bundle(tiny_bundles["bitnet"][1])


@pytest.fixture(scope="module")
def packs(bundle, tmp_path_factory):
    """One pack per kind of target; the first builds bytedeploy's wheel, the others take it with --wheel."""
    out = tmp_path_factory.mktemp("packs")
    result = invoke("pack", bundle.path, "--target", "cpu", "-o", out / "tiny-cpu.tar.gz")
    assert result.exit_code == 0, result.output
    with tarfile.open(out / "tiny-cpu.tar.gz") as tar:
        wheel = next(m for m in tar.getmembers() if m.name.endswith(".whl"))
        (out / os.path.basename(wheel.name)).write_bytes(tar.extractfile(wheel).read())
    paths = {"cpu": out / "tiny-cpu.tar.gz"}
    for target in ("orin-nano-8gb", "x86-gpu"):
        paths[target] = out / f"tiny-{target}.tar.gz"
        result = invoke("pack", bundle.path, "--target", target, "-o", paths[target], "--wheel",
                        out / os.path.basename(wheel.name))
        assert result.exit_code == 0, result.output
    return paths


def read_members(path):
    with tarfile.open(path) as tar:
        return {m.name: (m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()}


def test_members_modes_and_checksums(bundle, packs):
    members = read_members(packs["cpu"])
    top = "tiny-cpu"
    wheel = f"wheels/bytedeploy-{bundle.version}-py3-none-any.whl"
    files = {"run", "requirements.txt", "SHA256SUMS", wheel, "bundle/bundle.json",
             *(f"bundle/{f}" for f in bundle.files)}
    assert {n for n, (m, _) in members.items() if m.isfile()} == {f"{top}/{f}" for f in files}
    assert {n for n, (m, _) in members.items() if m.isdir()} == {top, f"{top}/bundle", f"{top}/bundle/onnx",
                                                                f"{top}/wheels"}
    for name, (m, _) in members.items():
        expected = 0o755 if m.isdir() or name == f"{top}/run" else 0o644
        assert (m.mode, m.uid, m.gid) == (expected, 0, 0), name
    sums = dict(reversed(line.split("  ")) for line in members[f"{top}/SHA256SUMS"][1].decode().splitlines())
    assert set(sums) == files - {"SHA256SUMS"}
    for rel, digest in sums.items():
        assert hashlib.sha256(members[f"{top}/{rel}"][1]).hexdigest() == digest, rel
    for rel in bundle.files:  # the bundle as exported, byte for byte
        assert members[f"{top}/bundle/{rel}"][1] == (bundle.path / rel).read_bytes()
    with zipfile.ZipFile(io.BytesIO(members[f"{top}/{wheel}"][1])) as z:
        names = z.namelist()
    for module in ("bytedeploy/cli.py", "bytedeploy/runtimes/ort.py", "bytedeploy/runtimes/pack.py",
                   "bytedeploy/exporters/bundle.py", "bytedeploy/plugins/ort_ops.py"):
        assert module in names


def requirements(path):
    name = os.path.basename(path).removesuffix(".tar.gz")
    return read_members(path)[f"{name}/requirements.txt"][1].decode()


def test_requirements_per_target(packs):
    reqs = {t: [line for line in requirements(p).splitlines() if not line.startswith("#")] for t, p in packs.items()}
    for target, lines in reqs.items():
        names = [pk.requirement_name(line) for line in lines if not line.startswith("--")]
        assert "torch" not in names and "triton" not in names and "numpy" in names and "onnx" in names
        assert [n for n in names if n.startswith("onnxruntime") and n != "onnxruntime-extensions"] == \
            [tg.TARGETS[target].onnxruntime]
    assert f"--extra-index-url {tg.JETPACK6_ORT}" in reqs["orin-nano-8gb"]
    assert not any(line.startswith("--") for line in reqs["cpu"] + reqs["x86-gpu"])
    assert "not on PyPI" in requirements(packs["orin-nano-8gb"])


def test_run_script(packs):
    for target, path in packs.items():
        name = os.path.basename(path).removesuffix(".tar.gz")
        script = read_members(path)[f"{name}/run"][1].decode()
        assert script.startswith("#!/bin/sh\n") and "@" not in script.replace("$@", "")
        assert f"--target {target}" in script and "wheels/bytedeploy-" in script
        assert ("--system-site-packages" in script) == (target == "orin-nano-8gb")
        assert ("[ no = yes ]" in script) == (target == "cpu")  # no TensorRT engines for a CPU
        checked = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True)
        assert checked.returncode == 0, checked.stderr


def test_unpack_and_its_refusals(packs, tmp_path):
    dest = tmp_path / "opt"
    result = invoke("unpack", packs["cpu"], "-o", dest)
    assert result.exit_code == 0, result.output
    folder = dest / "tiny-cpu"
    assert os.access(folder / "run", os.X_OK) and (folder / "bundle" / "bundle.json").is_file()
    assert (folder.stat().st_mode & 0o777, (folder / "requirements.txt").stat().st_mode & 0o777) == (0o755, 0o644)
    one_line_error(invoke("unpack", packs["cpu"], "-o", dest), "exists; use --force")
    (folder / "run").write_text("edited")
    assert invoke("unpack", packs["cpu"], "-o", dest, "--force").exit_code == 0
    assert (folder / "run").read_text().startswith("#!/bin/sh")
    assert sorted(p.name for p in dest.iterdir()) == ["tiny-cpu"]  # no staging folder left


def rewrite(src, dst, change):
    """A copy of the pack src with change(name, info, data) -> [(info, data), ...] applied to each member."""
    with tarfile.open(src) as tar, tarfile.open(dst, "w:gz") as out:
        for m in tar.getmembers():
            data = tar.extractfile(m).read() if m.isfile() else None
            for info, content in change(m.name, m, data):
                info.size = len(content) if content is not None else 0
                out.addfile(info, io.BytesIO(content) if content is not None else None)
    return dst


def add_member(info, data=None):
    def change(name, m, content):
        extra = [(info, data)] if name == "tiny-cpu/run" else []
        return [(m, content), *extra]
    return change


def link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


BAD_PACKS = {
    "member outside": (add_member(tarfile.TarInfo("tiny-cpu/../../evil.txt"), b"x"), "would land outside"),
    "symlink": (add_member(link("tiny-cpu/passwd", "/etc/passwd")), "'tiny-cpu/passwd' is not a file or a folder"),
    "hard link": (add_member(link("tiny-cpu/h", "tiny-cpu/run", tarfile.LNKTYPE)), "is not a file or a folder"),
    "second folder": (add_member(tarfile.TarInfo("other/x"), b"x"), "2 top-level entries"),
    "edited file": (lambda name, m, d: [(m, d.replace(b"python3", b"python9") if name == "tiny-cpu/run" else d)],
                    "run in the pack does not match its sha256"),
    "extra file": (add_member(tarfile.TarInfo("tiny-cpu/bundle/extra.onnx"), b"x"),
                   "holds bundle/extra.onnx, which its SHA256SUMS does not list"),
    "missing file": (lambda name, m, d: [] if name == "tiny-cpu/requirements.txt" else [(m, d)],
                     "lacks requirements.txt"),
}


@pytest.mark.parametrize("case", list(BAD_PACKS))
def test_unpack_refuses(packs, tmp_path, case):
    change, words = BAD_PACKS[case]
    bad = rewrite(packs["cpu"], tmp_path / "bad.tar.gz", change)
    dest = tmp_path / "dest"
    one_line_error(invoke("unpack", bad, "-o", dest), words)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "tiny-cpu").exists()
    assert not dest.exists() or list(dest.iterdir()) == []  # no staging folder left behind


def test_unpack_refuses_a_file_that_is_no_pack(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"not gzip")
    one_line_error(invoke("unpack", tmp_path / "x.tar.gz"), "cannot unpack")
    one_line_error(invoke("unpack", tmp_path / "missing.tar.gz"), "pack not found")


def test_pack_refusals(bundle, packs, tmp_path, monkeypatch):
    one_line_error(invoke("pack", bundle.path, "--target", "jetson", "-o", tmp_path / "a.tar.gz"), "unknown target")
    one_line_error(invoke("pack", bundle.path, "--target", "cpu", "-o", tmp_path / "a.zip"), "name it NAME.tar.gz")
    one_line_error(invoke("pack", bundle.path, "--target", "cpu", "-o", packs["cpu"]), "exists; use --force")
    one_line_error(invoke("pack", bundle.path, "--target", "cpu", "-o", tmp_path / "a.tar.gz", "--wheel",
                          tmp_path / "other-1.0-py3-none-any.whl"), "wheel not found")
    monkeypatch.setattr(tg, "RUNTIME_BYTES", 3 << 30)  # more than an Orin Nano 4GB's usable share
    one_line_error(invoke("pack", bundle.path, "--target", "orin-nano-4gb", "-o", tmp_path / "a.tar.gz"),
                   "does not fit 2.40 GiB even at batch 1")
    assert list(tmp_path.iterdir()) == []


def site_packages(python):
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_packed_artifact_runs_in_a_torch_free_venv(deploy_venv, bundle, packs, tmp_path):
    """Unpack with the deploy install, then run the pack's script in a new venv that sees the deploy install's
    packages (a .pth file) and has no torch: it installs the packed wheel from the pack, offline, and generates the
    full install's greedy output."""
    unpacked = subprocess.run([deploy_venv, "-m", "bytedeploy", "unpack", packs["cpu"], "-o", tmp_path],
                              capture_output=True, text=True, cwd=tmp_path)  # not the repository's bytedeploy/
    assert unpacked.returncode == 0, unpacked.stderr
    venv = tmp_path / "venv"
    subprocess.run([deploy_venv, "-m", "venv", "--without-pip", venv], check=True)
    with open(os.path.join(site_packages(venv / "bin" / "python"), "deploy.pth"), "w") as f:
        f.write(site_packages(deploy_venv) + "\n")
    (tmp_path / "no-wheels").mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "BYTEDEPLOY_VENV": str(venv),
           "BYTEDEPLOY_WHEELS": str(tmp_path / "no-wheels"), "PIP_NO_INDEX": "1"}
    run = [str(tmp_path / "tiny-cpu" / "run")]
    first = subprocess.run([*run, *PROMPT], capture_output=True, env=env)
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout == invoke("generate", bundle.path, *PROMPT).stdout_bytes
    probe = "import bytedeploy; print(bytedeploy.__file__); import torch"
    installed = subprocess.run([venv / "bin" / "python", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert installed.stdout.startswith(site_packages(venv / "bin" / "python"))  # the packed wheel, not the deploy's
    assert "No module named 'torch'" in installed.stderr
    served = subprocess.run([*run, "serve", "--help"], capture_output=True, text=True, env=env)
    assert served.returncode == 0 and "Usage: bytedeploy serve" in served.stdout, served.stderr
