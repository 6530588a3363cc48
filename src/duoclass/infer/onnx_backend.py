"""The ONNX Runtime backend: a model folder's ONNX variant run without torch.

    backend = OnnxBackend("runs/xray/model/variants/onnx/model.onnx")
    logits = backend.run({"pixel_values": x})           # float32 numpy (B, C)

With the torch-free preprocessing (preprocess.py) and the predict path (predict.py), this is all
a machine needs to run an exported duoclass model: onnxruntime, numpy, Pillow and tokenizers.
This module imports neither torch nor onnx.

Threads: ONNX Runtime's default is one intra-op thread per logical core, which on a machine with
hyper-threads (or a container limited to fewer cores than the host has) oversubscribes the
cores. duoclass uses the cores this process may run on (the scheduler affinity), one inter-op
thread and sequential execution. `threads=` (`duoclass.load(..., threads=N)`, `--threads N`) overrides
it; without it DUOCLASS_ONNX_THREADS does.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from duoclass.errors import DuoclassError

DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def available_cores() -> int:
    """The cores this process may use (the CPU affinity where the OS reports it, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    env = os.environ.get("DUOCLASS_ONNX_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise DuoclassError(f"DUOCLASS_ONNX_THREADS={env!r}: not a whole number; set it to the thread count, e.g. 2") from None
        if n < 1:
            raise DuoclassError(f"DUOCLASS_ONNX_THREADS={env!r}: must be at least 1")
        return n
    return available_cores()


def cpu_features() -> dict[str, Any]:
    """What this CPU offers for int8 arithmetic: AVX2, AVX-512 VNNI, AVX-VNNI, AMX (x86) or dot product (Arm).

    Read from /proc/cpuinfo on Linux; elsewhere only the architecture is known and every flag is False.
    """
    machine = platform.machine().lower()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    out = {
        "machine": machine,
        "avx2": "avx2" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
        "arm_dotprod": "asimddp" in flags,
        "known": bool(flags),
    }
    out["vnni"] = out["avx512_vnni"] or out["avx_vnni"] or out["amx_int8"]
    return out


class OnnxBackend:
    """An ONNX Runtime session on the CPU behind the Backend interface (backends.Backend)."""

    def __init__(self, path: str | Path, threads: int | None = None, name: str = "onnx"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise DuoclassError(f"--backend {name}: needs onnxruntime; install it with `pip install onnxruntime`") from None
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise DuoclassError(f"threads={threads!r}: ONNX Runtime needs a whole number of threads >= 1 "
                                "(leave it out for DUOCLASS_ONNX_THREADS, else one per core this process may use)")
        self.path = Path(path)
        self.name = name
        self.threads = threads or default_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: ONNX Runtime's warnings about unused initializers are noise here
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise DuoclassError(f"{self.path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:300]}); "
                                "export the model again with `duoclass export MODEL_DIR --format onnx`") from None
        self.inputs = {i.name: DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.output = self.session.get_outputs()[0].name

    def __repr__(self) -> str:
        return f"OnnxBackend(name={self.name!r}, path={str(self.path)!r}, threads={self.threads})"

    def run(self, inputs: Mapping[str, Any]) -> np.ndarray:
        feed = {}
        for k, dtype in self.inputs.items():
            if k not in inputs:
                raise DuoclassError(f"{self.path}: the model needs the input {k!r}, which the preprocessor did not make; "
                                    "the folder's ONNX file and config.json do not belong together, export it again")
            v = inputs[k]
            if not isinstance(v, np.ndarray):  # a tensor from the training side
                v = v.detach().cpu().numpy()
            feed[k] = np.ascontiguousarray(v, dtype=dtype)
        return np.asarray(self.session.run([self.output], feed)[0], dtype=np.float32)
