"""`bytedeploy doctor` on fake system roots (a Jetson Orin Nano, an AGX Orin, x86 servers with and without a GPU),
the targets table, the memory plan, and `build --target/--max-memory`. Nothing here needs a GPU or a Jetson."""

import dataclasses
import json
import subprocess
import sys
import textwrap
import types

import onnx
import onnx.helper as oh
import pytest
import torch
from click.testing import CliRunner
from gpu_marks import gpu_test

from bytedeploy.cli import cli
from bytedeploy.errors import UserError
from bytedeploy.exporters import trt_build
from bytedeploy.exporters.bundle import load_bundle
from bytedeploy.runtimes import doctor as dr
from bytedeploy.runtimes import targets as tg

GiB = 1 << 30
MiB = 1 << 20


# ---- fake system roots ------------------------------------------------------------------------------------------

def write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def jetson_root(root, model, compatible, release, revision, cuda, mem_kb):
    write(root, "etc/nv_tegra_release", f"# R{release} (release), REVISION: {revision}, GCID: 38968081, BOARD: "
                                         "generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n")
    write(root, "proc/device-tree/model", model + "\0")
    write(root, "proc/device-tree/compatible", "\0".join(compatible) + "\0")
    write(root, "proc/meminfo", f"MemTotal:       {mem_kb} kB\nMemFree:         1000000 kB\n")
    write(root, "usr/local/cuda/version.json", json.dumps({"cuda": {"name": "CUDA SDK", "version": cuda}}))
    return root


def orin_nano(root):  # the Orin Nano developer kit (8GB module p3767-0005), JetPack 6.2
    return jetson_root(root, "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
                       ["nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005", "nvidia,tegra234"], 36, "4.3",
                       "12.6.68", 7_802_816)


def agx_orin(root):  # the AGX Orin 64GB developer kit, JetPack 5.1.2
    return jetson_root(root, "NVIDIA Jetson AGX Orin Developer Kit",
                       ["nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005", "nvidia,tegra234"], 35, "4.1",
                       "11.4.315", 64_335_836)


def x86_server(root):  # no GPU: no nvidia-smi, no /proc/driver/nvidia
    write(root, "proc/meminfo", "MemTotal:       263842304 kB\n")
    return root


SMI = """#!/bin/sh
case "$1" in
  -q) printf '\\n==============NVSMI LOG==============\\n\\nDriver Version                            : 550.54.15\\n'
      printf 'CUDA Version                              : 12.4\\n\\nAttached GPUs                             : 1\\n';;
  --query-gpu=*) echo "NVIDIA H100 80GB HBM3, 9.0, 81559, 550.54.15";;
  *) exit 2;;
esac
"""


def gpu_server(root, smi=SMI):
    x86_server(root)
    write(root, "usr/bin/nvidia-smi", smi).chmod(0o755)
    return root


def doctor_json(monkeypatch, root, *args, arch="x86_64"):
    monkeypatch.setenv(dr.SYSROOT_ENV, str(root))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(dr.platform, "machine", lambda: arch)
    result = CliRunner().invoke(cli, ["doctor", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def backends(report):
    return {b["backend"]: b for b in report["backends"]}


def test_orin_nano(tmp_path, monkeypatch):
    report = doctor_json(monkeypatch, orin_nano(tmp_path), arch="aarch64")
    m = report["machine"]
    assert m["arch"] == "aarch64" and m["memory"] == 7_802_816 * 1024
    assert m["jetson"] == {"model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
                           "target": "orin-nano-8gb", "l4t": "36.4.3", "jetpack": "6.2"}
    assert m["gpus"] == [{"name": "Jetson Orin Nano 8GB GPU (integrated)", "compute_capability": "8.7",
                          "memory": 7_802_816 * 1024, "driver": "L4T R36.4.3", "cuda": "12.6.68", "source": "jetson"}]
    ort_cuda = backends(report)["ort-cuda"]  # this machine's onnxruntime has no CUDA provider
    assert ort_cuda["runs"] is False
    assert "JetPack 6" in ort_cuda["detail"] and tg.JETPACK6_ORT in ort_cuda["detail"]
    assert backends(report)["ort"]["runs"] is True


def test_agx_orin(tmp_path, monkeypatch):
    report = doctor_json(monkeypatch, agx_orin(tmp_path), arch="aarch64")
    m = report["machine"]
    assert m["jetson"]["target"] == "agx-orin-64gb"
    assert (m["jetson"]["l4t"], m["jetson"]["jetpack"]) == ("35.4.1", "5.1.2")
    gpu = m["gpus"][0]
    assert (gpu["compute_capability"], gpu["memory"], gpu["cuda"]) == ("8.7", 64_335_836 * 1024, "11.4.315")


def test_x86_server_without_gpu(tmp_path, monkeypatch):
    report = doctor_json(monkeypatch, x86_server(tmp_path))
    m = report["machine"]
    assert (m["jetson"], m["gpus"], m["memory"]) == (None, [], 263842304 * 1024)
    b = backends(report)
    assert b["ort"]["runs"] is True
    for name in ("ort-cuda", "trt"):
        assert b[name]["runs"] is False and b[name]["detail"].startswith("no NVIDIA GPU found")
    assert "onnxruntime" in m["packages"] and "torch" in m["packages"]


def test_x86_server_with_gpu_from_nvidia_smi(tmp_path, monkeypatch):
    report = doctor_json(monkeypatch, gpu_server(tmp_path))
    assert report["machine"]["gpus"] == [{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                                          "memory": 81559 * MiB, "driver": "550.54.15", "cuda": "12.4",
                                          "source": "nvidia-smi"}]
    ort_cuda = backends(report)["ort-cuda"]
    assert ort_cuda["runs"] is False and "pip install onnxruntime-gpu" in ort_cuda["detail"]


def test_nvidia_smi_that_fails_is_reported(tmp_path, monkeypatch):
    broken = "#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\n" \
             "exit 9\n"
    report = doctor_json(monkeypatch, gpu_server(tmp_path, broken))
    assert report["machine"]["gpus"] == []
    assert "couldn't communicate with the NVIDIA driver" in report["machine"]["gpu_problem"]
    assert "couldn't communicate" in backends(report)["trt"]["detail"]


def test_text_report(tmp_path, monkeypatch):
    monkeypatch.setenv(dr.SYSROOT_ENV, str(orin_nano(tmp_path)))
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Jetson Orin Nano 8GB (target orin-nano-8gb), L4T R36.4.3, JetPack 6.2" in out
    assert "compute capability 8.7" in out and "CUDA 12.6.68 (from jetson)" in out
    assert "\n  ort              runs here:" in out


@gpu_test()
def test_doctor_sees_this_gpu(monkeypatch):
    """On a GPU machine, the real root: nvidia-smi's GPU is the one torch sees."""
    monkeypatch.delenv(dr.SYSROOT_ENV, raising=False)
    gpu = dr.inspect_machine().gpus[0]
    props = torch.cuda.get_device_properties(0)
    assert (gpu.name, gpu.source) == (props.name, "nvidia-smi")
    assert gpu.compute_capability == f"{props.major}.{props.minor}"
    assert abs(gpu.memory - props.total_memory) < 0.05 * props.total_memory
    assert gpu.driver and gpu.cuda


# ---- bundles --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundles(tiny_bundles):
    return {family: load_bundle(tiny_bundles[family][1]) for family in ("bitnet", "sigma-gpt", "bgpt", "bfn")}


def test_backend_lines_for_a_bundle(bundles, tmp_path, monkeypatch):
    report = doctor_json(monkeypatch, x86_server(tmp_path), str(bundles["sigma-gpt"].path))
    b = backends(report)
    assert report["bundle"]["family"] == "sigma-gpt"
    assert list(b) == ["ort", "ort-cuda", "trt", "burst", *dr.CHECKPOINT_BACKENDS]
    assert b["ort"]["runs"] is True and b["burst"]["runs"] is True
    assert all(b[name]["runs"] is None for name in dr.CHECKPOINT_BACKENDS)


def test_plugin_bundle_needs_onnxruntime_extensions(tiny_bundles, tmp_path, monkeypatch):
    versions = dr.package_versions()
    monkeypatch.setattr(dr, "package_versions", lambda: {**versions, "onnxruntime-extensions": None})
    plugin = str(tiny_bundles["bitnet-plugin"][1])
    b = backends(doctor_json(monkeypatch, x86_server(tmp_path), plugin))
    assert b["ort"]["runs"] is False and "pip install onnxruntime-extensions" in b["ort"]["detail"]
    assert backends(doctor_json(monkeypatch, tmp_path, str(tiny_bundles["bitnet"][1])))["ort"]["runs"] is True


def fake_tensorrt(version="10.13.0.35"):
    return types.SimpleNamespace(__version__=version), "tensorrt"


def test_trt_line_checks_the_engines(bundles, tmp_path, monkeypatch):
    """With (a stand-in for) full TensorRT and an H100: no engines, then engines built for this GPU, then engines
    built for another one; the bundle's engines folder works as the argument too."""
    bundle = bundles["bitnet"]
    monkeypatch.setattr(trt_build, "import_tensorrt", fake_tensorrt)
    root = gpu_server(tmp_path / "root")
    engines = tmp_path / "engines"
    trt = backends(doctor_json(monkeypatch, root, str(bundle.path)))["trt"]
    assert trt["runs"] is False and "no TensorRT engine for graph 'prefill'" in trt["detail"]
    for graph, spec in bundle.graphs.items():
        engines.mkdir(exist_ok=True)
        (engines / f"{graph}.engine").write_bytes(b"engine")
        (engines / f"{graph}.json").write_text(json.dumps(
            {"graph_sha256": bundle.files[spec.file], "module": "tensorrt", "tensorrt_version": "10.13.0.35",
             "compute_capability": "9.0", "plugins": []}))
    monkeypatch.setattr(dr, "open_bundle", lambda path: (load_bundle(bundle.path), engines))
    trt = backends(doctor_json(monkeypatch, root, str(engines)))["trt"]
    assert trt["runs"] is True and "built for this GPU (9.0)" in trt["detail"]
    monkeypatch.setattr(trt_build, "import_tensorrt", lambda: fake_tensorrt("10.14.1.48"))
    trt = backends(doctor_json(monkeypatch, root, str(engines)))["trt"]
    assert trt["runs"] is False and "rebuild it here" in trt["detail"]


def test_engines_folder_as_the_argument(bundles):
    bundle, engines = dr.open_bundle(bundles["bitnet"].path / "engines")
    assert (bundle.path, engines) == (bundles["bitnet"].path, bundles["bitnet"].path / "engines")


def test_doctor_imports_no_torch(bundles, tmp_path):
    """A blocker on the import system makes `import torch` fail; doctor with a bundle, a GPU and a memory plan still
    runs."""
    code = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch is blocked")
        sys.meta_path.insert(0, NoTorch())
        from bytedeploy.cli import main
        sys.argv = ["bytedeploy", "doctor", {str(bundles['bitnet'].path)!r}, "--memory", "2GiB", "--json"]
        main()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"BYTEDEPLOY_SYSROOT": str(gpu_server(tmp_path)), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["memory_plan"]["largest"]["batch"] == tg.PLANNED_MAX_BATCH
    assert report["machine"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"  # the trt line's checks ran too


# ---- targets ----------------------------------------------------------------------------------------------------

def test_targets_table():
    jetsons = [t for t in tg.TARGETS.values() if t.platform == "jetson"]
    assert {t.name for t in jetsons} == {"orin-nano-4gb", "orin-nano-8gb", "orin-nx-8gb", "orin-nx-16gb",
                                         "agx-orin-32gb", "agx-orin-64gb", "agx-thor"}
    for t in jetsons:
        assert t.compute_capability == ("11.0" if t.name == "agx-thor" else "8.7")
        assert 0 < t.usable_share < 1 and t.usable_memory < t.memory
        assert t.onnxruntime == "onnxruntime-gpu" and t.onnxruntime_index.startswith("https://pypi.jetson-ai-lab.io/")
    assert [tg.TARGETS[n].memory // GiB for n in ("orin-nano-4gb", "orin-nano-8gb", "orin-nx-8gb", "orin-nx-16gb",
                                                  "agx-orin-32gb", "agx-orin-64gb", "agx-thor")] == \
        [4, 8, 8, 16, 32, 64, 128]
    assert (tg.TARGETS["cpu"].onnxruntime, tg.TARGETS["x86-gpu"].onnxruntime) == ("onnxruntime", "onnxruntime-gpu")
    with pytest.raises(UserError, match="unknown target 'orin'; known: orin-nano-4gb"):
        tg.get_target("orin")


@pytest.mark.parametrize("model, compatible, memory, name", [
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "nvidia,p3768-0000+p3767-0001", None, "orin-nx-8gb"),
    ("NVIDIA Jetson Orin Nano Developer Kit", "nvidia,p3767-0004", None, "orin-nano-4gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", "nvidia,p3737-0000+p3701-0000", 31 * GiB, "agx-orin-32gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", "nvidia,p3737-0000+p3701-0000", 62 * GiB, "agx-orin-64gb"),
    ("NVIDIA Jetson AGX Thor Developer Kit", "nvidia,tegra264", 122 * GiB, "agx-thor"),
    ("Raspberry Pi 4 Model B", "raspberrypi,4-model-b", GiB, None),
])
def test_jetson_target_from_device_tree(model, compatible, memory, name):
    target = tg.jetson_target(model, compatible, memory)
    assert (target.name if target else None) == name


def test_sizes():
    assert tg.parse_size("8GiB") == tg.parse_size("8G") == tg.parse_size("8g") == 8 * GiB
    assert tg.parse_size("8GB") == 8 * 10**9 and tg.parse_size("512MiB") == 512 * MiB
    assert tg.parse_size("1.5GiB") == 3 * GiB // 2 and tg.parse_size("4096") == 4096
    for bad in ("eight", "8Xb", "8i", "-1G", ""):
        with pytest.raises(UserError, match="cannot read the size"):
            tg.parse_size(bad)
    assert tg.format_bytes(3 * GiB // 2) == "1.50 GiB" and tg.format_bytes(1536) == "1.5 KiB"


# ---- the memory plan ----------------------------------------------------------------------------------------------

def test_weight_bytes_count_initializers_and_constants(tmp_path):
    weights = [oh.make_tensor("w", onnx.TensorProto.FLOAT, [10, 20], [0.0] * 200),  # typed data: 800 bytes
               oh.make_tensor("q", onnx.TensorProto.INT4, [7], [1] * 7),  # packed: 4 bytes
               oh.make_tensor("h", onnx.TensorProto.FLOAT16, [3, 5], b"\0" * 30, raw=True)]  # 30 bytes
    const = oh.make_node("Constant", [], ["c"], value=oh.make_tensor("cv", onnx.TensorProto.FLOAT, [3], [1, 2, 3]))
    graph = oh.make_graph([const, oh.make_node("Identity", ["c"], ["y"])], "g", [],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])], weights)
    onnx.save(oh.make_model(graph), str(tmp_path / "g.onnx"))
    assert tg.graph_weight_bytes(tmp_path / "g.onnx") == 800 + 4 + 30 + 12


def kv(layers, heads, head_dim, batch, length, element=4):
    return layers * 2 * batch * heads * length * head_dim * element


def test_caches_follow_the_model_configs(bundles):
    bitnet = tg.bundle_plan(bundles["bitnet"])
    c = bundles["bitnet"].model_config
    e = bitnet.estimate(3, 100)
    assert e.cache == 2 * kv(c["n_layer"], c["n_head"], c["n_embd"] // c["n_head"], 3, 100)  # past and present
    assert e.workspace == tg.RUNTIME_BYTES + 3 * 100 * (8 * c["n_embd"] + c["n_head"] * 100 + 256) * 4
    assert dataclasses.replace(bitnet, precision="fp16").estimate(3, 100).cache == e.cache // 2

    c = bundles["bgpt"].model_config
    byte_cache = kv(c["byte_n_layer"], c["byte_n_head"], c["n_embd"] // c["byte_n_head"], 2, c["patch_size"] + 1)
    patch_cache = kv(c["n_layer"], c["n_head"], c["n_embd"] // c["n_head"], 2, 40)
    assert tg.bundle_plan(bundles["bgpt"]).estimate(2, 40).cache == 2 * (patch_cache + byte_cache)

    c = bundles["bfn"].model_config
    bfn = tg.bundle_plan(bundles["bfn"])
    assert bfn.estimate(5, c["seq_len"]).cache == 2 * 5 * c["seq_len"] * c["vocab_size"] * 4  # the belief
    assert bfn.contexts() == [c["seq_len"]]


def test_weights_are_every_graphs_initializers(bundles):
    b = bundles["bgpt"]
    plan = tg.bundle_plan(b)
    assert plan.weights == sum(tg.graph_weight_bytes(b.graph_path(g)) for g in b.graphs)
    files = sum(b.graph_path(g).stat().st_size for g in b.graphs)
    # the graph files are mostly their weights (on this tiny model byte_patch's 16 unrolled steps weigh about as much)
    assert 0.5 * files < plan.weights < files


def test_choose_profile_is_the_largest_that_fits(bundles):
    plan = tg.bundle_plan(bundles["bitnet"])
    context = plan.shape.context
    budget = plan.estimate(5, context).total + 1000
    best = tg.choose_profile(plan, budget)
    assert (best.batch, best.context) == (5, context) and best.total <= budget < plan.estimate(6, context).total
    assert tg.choose_profile(plan, budget, max_batch=3).batch == 3
    assert tg.choose_profile(plan, budget, max_len=context // 2).context == context // 2
    tight = plan.estimate(1, context - 3).total  # batch 1 fits only up to context - 3
    assert (tg.choose_profile(plan, tight).batch, tg.choose_profile(plan, tight).context) == (1, context - 3)
    with pytest.raises(UserError, match=r"does not fit 100.0 MiB even at batch 1: it needs 51\d\.\d MiB: weights"):
        tg.choose_profile(plan, 100 * MiB)


def test_doctor_prints_the_plan(bundles, tmp_path, monkeypatch):
    monkeypatch.setenv(dr.SYSROOT_ENV, str(x86_server(tmp_path)))
    bundle = bundles["bitnet"]
    plan = tg.bundle_plan(bundle)
    context = plan.shape.context
    budget = plan.estimate(8, context).total
    result = CliRunner().invoke(cli, ["doctor", str(bundle.path), "--memory", str(budget)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("memory plan: bitnet fp32")))
    assert plan.contexts() == [context // 8, context // 4, context // 2, context]
    assert lines[start + 1].split() == ["batch", *(w for c in plan.contexts() for w in ("context", str(c)))]
    row8, row16 = lines[start + 5].split(), lines[start + 6].split()  # batches 1, 2, 4, then 8 and 16
    assert row8[0] == "8" and row8[-1] == "ok" and row16[0] == "16" and row16[-1] == "--"
    assert lines[start + 9] == \
        f"largest that fits (batch <= 64): batch 8 at context {context}, {tg.format_bytes(budget)}"
    report = doctor_json(monkeypatch, tmp_path, str(bundle.path), "--memory", "1GiB")
    cells = {(e["batch"], e["context"]): e for e in report["memory_plan"]["estimates"]}
    half = context // 2
    assert cells[4, half]["total"] == plan.estimate(4, half).total and cells[4, half]["fits"] is True


def test_memory_needs_a_bundle():
    result = CliRunner().invoke(cli, ["doctor", "--memory", "8GiB"])
    assert result.exit_code == 1 and result.output == "Error: --memory plans a bundle's memory: give the BUNDLE too\n"


# ---- build --target / --max-memory ------------------------------------------------------------------------------

def test_build_max_memory_chooses_the_profile(bundles, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    bundle = bundles["bitnet"]
    plan = tg.bundle_plan(bundle)
    context = plan.shape.context
    budget = plan.estimate(5, context).total + 1000
    out = tmp_path / "engines"
    result = CliRunner().invoke(cli, ["build", str(bundle.path), "-o", str(out), "--max-memory", str(budget),
                                      "--max-batch", "100"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"memory plan in {tg.format_bytes(budget)} (--max-memory "
                                    f"{tg.format_bytes(budget)}): profiles up to batch 5 and context {context}")
    profile = json.loads((out / "decode.json").read_text())["profile"]
    assert profile["pos"]["max"] == [5] and profile["past_k.0"]["max"][0:3:2] == [5, context]


@pytest.mark.parametrize("args, words", [
    (["--max-memory", "300MiB"], "does not fit 300.0 MiB even at batch 1"),
    (["--target", "orin-nano-8gb"], "TensorRT-RTX engines do not run on a Jetson Orin Nano 8GB"),
    (["--target", "cpu"], "target cpu has no GPU"),
    (["--target", "nano"], "unknown target 'nano'"),
    (["--max-memory", "lots"], "cannot read the size 'lots'"),
])
def test_build_refuses_in_one_line(bundles, tmp_path, args, words):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    result = CliRunner().invoke(cli, ["build", str(bundles["bitnet"].path), "-o", str(tmp_path / "e"), *args])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and words in result.output, result.output
    assert not (tmp_path / "e").exists()


def test_build_target_checks_the_gpu(bundles, monkeypatch):
    """Full TensorRT builds for the GPU it runs on: an H100 cannot build an Orin's engines."""
    monkeypatch.setattr(trt_build, "import_tensorrt", fake_tensorrt)
    monkeypatch.setattr(trt_build, "cuda_compute_capability", lambda: "9.0")
    with pytest.raises(UserError, match=r"target agx-orin-32gb is compute capability 8.7 and this GPU is 9.0"):
        tg.plan_build(bundles["bitnet"], tg.get_target("agx-orin-32gb"), None, None, None)
    monkeypatch.setattr(trt_build, "cuda_compute_capability", lambda: "8.7")
    best, line = tg.plan_build(bundles["bitnet"], tg.get_target("agx-orin-32gb"), None, None, None)
    assert (best.batch, best.context) == (64, bundles["bitnet"].model_config["block_size"])
    assert "(agx-orin-32gb: 85% of 32.00 GiB)" in line
    assert tg.plan_build(bundles["bitnet"], tg.get_target("x86-gpu"), None, None, None) is None


def test_doctor_runs_in_the_deploy_install(deploy_venv, bundles, tmp_path):
    out = subprocess.run([deploy_venv, "-m", "bytedeploy", "doctor", str(bundles["bitnet"].path), "--json"],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={"BYTEDEPLOY_SYSROOT": str(orin_nano(tmp_path / "root")), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["machine"]["packages"]["torch"] is None and report["machine"]["jetson"]["target"] == "orin-nano-8gb"
    assert {b["backend"]: b["runs"] for b in report["backends"]}["ort"] is True
