"""The benchmarks' shared helpers: what they say about the machine, and the dtype a benchmark
picks by default (bf16 only where the CPU computes it natively)."""

import argparse
import importlib.util
from pathlib import Path

import torch

from benchmarks import common

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_cpu_info_names_the_cpu_and_its_vector_extensions():
    info = common.cpu_info()
    assert info["cpu_model"] and info["cpus"] >= 1
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(info["vector_extensions"]) <= set(common.VECTOR_FLAGS)
    flags = common._proc_cpuinfo()[1]
    assert info["vector_extensions"] == [flag for flag in common.VECTOR_FLAGS if flag in flags]
    machine = common.machine_info("transformers")
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == torch.get_num_threads()
    assert machine["transformers"] == common.package_version("transformers") is not None


def test_bf16_is_native_only_with_bf16_units_not_held_back(monkeypatch):
    has_units = any(flag in common._proc_cpuinfo()[1] for flag in common.BF16_FLAGS)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    expected = has_units and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert common.has_native_bf16() is expected
    assert common.native_dtype("cpu") == (torch.bfloat16 if expected else torch.float32)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert common.has_native_bf16() is False and common.native_dtype("cpu") == torch.float32
    assert common.cpu_info()["isa_settings"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_loss_memory_defaults_to_the_native_dtype(monkeypatch):
    spec = importlib.util.spec_from_file_location("loss_memory_benchmark", BENCHMARKS / "loss_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "native_dtype", lambda device: torch.float32)
    monkeypatch.setattr(module, "has_native_bf16", lambda: False)
    name, reason = module.default_dtype("cpu")
    assert name == "float32" and "emulated" in reason
    monkeypatch.setattr(module, "native_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(module, "has_native_bf16", lambda: True)
    assert module.default_dtype("cpu")[0] == "bfloat16"


def test_matmul_peak_and_model_options():
    assert common.matmul_tflops(64, iters=1, rounds=1) > 0
    args = common.add_model_args(argparse.ArgumentParser(), image_size=32).parse_args(["--vocab", "1000"])
    assert args.image_size == 32 and args.vocab_size == 1000 and args.d_model == 512
