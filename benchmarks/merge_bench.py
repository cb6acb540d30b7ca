"""Benchmark: the streaming merge engine vs PEFT ``merge_and_unload`` + save vs the I/O floor.

    .venv/bin/python benchmarks/merge_bench.py                      # full run, writes docs/benchmarks.md
    .venv/bin/python benchmarks/merge_bench.py --runs engine,floor --reps 1 --no-docs
    .venv/bin/python benchmarks/merge_bench.py --shape tinyllama-1.1b \
        --runs engine,engine-replay,floor,floor-pipelined,peft,peft-replay --once peft-replay

``engine-replay`` folds an adapter log of 10 incremental adapters in one pass; ``peft-replay``
is PEFT applying the same 10 one after another (``merge_and_unload``, then the next adapter).
Each shape's results replace its own section of the docs; the other sections are kept.

Input: a synthetic, sharded, Llama-shaped bf16 checkpoint (>= 1B parameters) generated locally
with random weights (cached in the work directory between runs), and a PEFT LoRA adapter with
r=16 on every linear layer of the decoder (q, k, v, o, gate, up, down). Each measured run is a
fresh subprocess, timed from the parent (wall) and by itself (work, excluding interpreter and
library start-up); peak RSS comes from ``wait4`` (ru_maxrss) and from polling /proc (RssAnon,
the process's own anonymous memory, which excludes shared-library pages).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
SHARD_BYTES = 1024 * MiB
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES: dict[str, dict[str, Any]] = {
    # Llama 3.2 1B (tied embeddings: lm_head is not stored).
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": True, "head_dim": 64},
    # TinyLlama 1.1B (untied, small vocabulary).
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                       "tie_word_embeddings": False, "head_dim": 64},
    # Llama 2 7B (untied).
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "tie_word_embeddings": False, "head_dim": 128},
}
RUNS = ("engine", "engine-replay", "peft", "peft-replay", "floor", "floor-pipelined")
DEFAULT_RUNS = ("engine", "peft", "floor", "floor-pipelined")
REPLAY_ADAPTERS = 10


# ---------------------------------------------------------------------------------------------
# Synthetic inputs


def tensor_shapes(shape: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        names += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.self_attn.q_proj.weight", (q, h)),
                  (f"{p}.self_attn.k_proj.weight", (kv, h)), (f"{p}.self_attn.v_proj.weight", (kv, h)),
                  (f"{p}.self_attn.o_proj.weight", (h, q)), (f"{p}.post_attention_layernorm.weight", (h,)),
                  (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
                  (f"{p}.mlp.down_proj.weight", (h, i))]
    names.append(("model.norm.weight", (h,)))
    if not shape["tie_word_embeddings"]:
        names.append(("lm_head.weight", (v, h)))
    return names


def input_paths(work: Path, shape_name: str) -> tuple[Path, Path, Path]:
    return work / f"base-{shape_name}", work / f"adapter-{shape_name}", work / f".ready-{shape_name}"


def replay_dir(work: Path, shape_name: str) -> Path:
    """``<n>/`` for n = 1..10: an adapter log of incremental adapters (``privatefm.json``)."""
    return work / f"adapters-{shape_name}"


def lora_tensors(shape: dict[str, Any], gen: Any) -> dict[str, Any]:
    """Random r=16 LoRA weights (float32) on every linear layer of the decoder."""
    import torch

    lora = {}
    for name, dims in tensor_shapes(shape):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LINEAR:
            out_features, in_features = dims
            key = f"base_model.model.{module}"
            lora[f"{key}.lora_A.weight"] = torch.randn(16, in_features, generator=gen) * 0.01
            lora[f"{key}.lora_B.weight"] = torch.randn(out_features, 16, generator=gen) * 0.01
    return lora


def generate_replay(work: Path, shape_name: str) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    root = replay_dir(work, shape_name)
    shutil.rmtree(root, ignore_errors=True)
    gen = torch.Generator().manual_seed(1)
    for seq in range(1, REPLAY_ADAPTERS + 1):
        directory = root / str(seq)
        directory.mkdir(parents=True)
        save_file(lora_tensors(SHAPES[shape_name], gen), str(directory / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        LoraConfig(r=16, lora_alpha=32, target_modules=list(LINEAR), task_type="CAUSAL_LM").save_pretrained(
            str(directory))
        (directory / "privatefm.json").write_text(json.dumps({"mode": "incremental"}))
    (root / ".ready").write_text("ok")


def generate_inputs(work: Path, shape_name: str) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    base, adapter, marker = input_paths(work, shape_name)
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    shape = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(0)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensor_shapes(shape):
        nbytes = 2 * math.prod(dims)
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, dims in shard:
            if len(dims) == 1:
                tensors[name] = torch.ones(dims, dtype=torch.bfloat16)
            else:
                values = torch.randn(dims, generator=gen, dtype=torch.float32) * 0.02
                tensors[name] = values.to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(base / file), metadata={"format": "pt"})
        del tensors
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    llama_config = LlamaConfig(**shape, architectures=["LlamaForCausalLM"])
    (base / "config.json").write_text(llama_config.to_json_string())

    save_file(lora_tensors(shape, gen), str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = LoraConfig(r=16, lora_alpha=32, target_modules=list(LINEAR), task_type="CAUSAL_LM")
    config.save_pretrained(str(adapter))
    marker.write_text("ok")


# ---------------------------------------------------------------------------------------------
# The measured children (each runs in its own process)


def child_engine(base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    from privatefm_merge.engine import MergeOptions, merge_checkpoint

    imported = time.perf_counter()
    summary = merge_checkpoint(str(base), str(adapter), str(out), MergeOptions(device="cpu"))
    return {"import_seconds": imported - started, "work_seconds": time.perf_counter() - imported,
            **{k: round(v, 3) for k, v in summary.timings.items()}}


def replay_adapters(adapter: Path) -> list[Path]:
    """The replay log that sits next to ``adapter`` (``adapter-<shape>`` -> ``adapters-<shape>``)."""
    root = adapter.with_name(adapter.name.replace("adapter-", "adapters-", 1))
    return [root / str(seq) for seq in range(1, REPLAY_ADAPTERS + 1)]


def child_engine_replay(base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    from privatefm_merge.engine import MergeOptions, merge_checkpoint

    imported = time.perf_counter()
    adapters = [str(a) for a in replay_adapters(adapter)]
    summary = merge_checkpoint(str(base), adapters, str(out), MergeOptions(device="cpu"))
    assert summary.manifest.adapter_seqs == list(range(1, REPLAY_ADAPTERS + 1))
    return {"import_seconds": imported - started, "work_seconds": time.perf_counter() - imported,
            **{k: round(v, 3) for k, v in summary.timings.items()}}


def child_peft_replay(base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    """PEFT applying the log one adapter after another: load, then merge_and_unload each."""
    started = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    imported = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    loaded = time.perf_counter()
    for directory in replay_adapters(adapter):
        model = PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    done = time.perf_counter()
    model.save_pretrained(str(out), max_shard_size="1GB")
    saved = time.perf_counter()
    return {"import_seconds": imported - started, "work_seconds": saved - imported,
            "load_seconds": loaded - imported, "merge_seconds": done - loaded, "save_seconds": saved - done}


def child_peft(base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    imported = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    loaded = time.perf_counter()
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    done = time.perf_counter()
    merged.save_pretrained(str(out), max_shard_size="1GB")
    saved = time.perf_counter()
    return {"import_seconds": imported - started, "work_seconds": saved - imported,
            "load_seconds": loaded - imported, "merge_seconds": done - loaded, "save_seconds": saved - done}


def child_floor(base: Path, _adapter: Path, out: Path) -> dict[str, Any]:
    """Copy every byte of the base and sha256 it: the least any merge has to do."""
    started = time.perf_counter()
    out.mkdir(parents=True)
    buffer = bytearray(16 * MiB)
    view = memoryview(buffer)
    for src in sorted(base.iterdir()):
        digest = hashlib.sha256()
        with open(src, "rb") as reader, open(out / src.name, "wb") as writer:
            while n := reader.readinto(buffer):
                digest.update(view[:n])
                writer.write(view[:n])
    return {"import_seconds": 0.0, "work_seconds": time.perf_counter() - started}


def child_floor_pipelined(base: Path, _adapter: Path, out: Path) -> dict[str, Any]:
    """The floor with the engine's overlap: read here into reused buffers; sha256 and write on
    a second thread, which hands each buffer back."""
    import queue

    started = time.perf_counter()
    out.mkdir(parents=True)
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(4):
        free.put(bytearray(16 * MiB))
    for src in sorted(base.iterdir()):
        chunks: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()

        def drain(path: Path, chunks: queue.Queue[tuple[bytearray, int] | None] = chunks) -> None:
            digest = hashlib.sha256()
            with open(path, "wb") as writer:
                while (item := chunks.get()) is not None:
                    buffer, n = item
                    view = memoryview(buffer)[:n]
                    digest.update(view)
                    writer.write(view)
                    view.release()
                    free.put(buffer)

        writer_thread = threading.Thread(target=drain, args=(out / src.name,))
        writer_thread.start()
        with open(src, "rb") as reader:
            while True:
                buffer = free.get()
                n = reader.readinto(buffer)
                if not n:
                    free.put(buffer)
                    break
                chunks.put((buffer, n))
        chunks.put(None)
        writer_thread.join()
    return {"import_seconds": 0.0, "work_seconds": time.perf_counter() - started}


def child_import(_base: Path, _adapter: Path, _out: Path) -> dict[str, Any]:
    """The engine's fixed cost: the interpreter with torch and the engine imported."""
    started = time.perf_counter()
    import privatefm_merge.engine  # noqa: F401
    import torch

    return {"import_seconds": time.perf_counter() - started, "work_seconds": 0.0, "torch": torch.__version__,
            "blas": "MKL" if torch.backends.mkl.is_available() else "other"}


CHILDREN = {"engine": child_engine, "engine-replay": child_engine_replay, "peft": child_peft,
            "peft-replay": child_peft_replay, "floor": child_floor, "floor-pipelined": child_floor_pipelined,
            "import": child_import}


# ---------------------------------------------------------------------------------------------
# Measurement


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def measure(kind: str, base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)  # start each run without the previous run's dirty pages
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'merge_image'}:{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", kind, str(base), str(adapter), str(out)],
                            stdout=subprocess.PIPE, env=env)
    peak_anon = 0

    def poll() -> None:
        nonlocal peak_anon
        while proc.returncode is None:
            peak_anon = max(peak_anon, _status_kib(proc.pid, "RssAnon"))
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    poller.join()
    assert proc.stdout is not None
    output = proc.stdout.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed with status {proc.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    return {"kind": kind, "wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "peak_anon_mib": peak_anon / 1024, **result}


def compare_outputs(engine_out: Path, peft_out: Path) -> tuple[int, int, float]:
    """(bit-identical tensors, tensors compared, largest |diff| / max |weight|) between the
    engine's and PEFT's outputs."""
    import torch
    from safetensors import safe_open

    def index(directory: Path) -> dict[str, Path]:
        found = {}
        for path in directory.glob("*.safetensors"):
            with safe_open(str(path), "pt") as handle:
                found.update({key: path for key in handle.keys()})  # noqa: SIM118
        return found

    ours, theirs = index(engine_out), index(peft_out)
    same, worst = 0, 0.0
    for name, path in ours.items():
        with safe_open(str(path), "pt") as a, safe_open(str(theirs[name]), "pt") as b:
            mine, other = a.get_tensor(name), b.get_tensor(name)
            same += torch.equal(mine, other)
            scale = float(other.float().abs().max()) or 1.0
            worst = max(worst, float((mine.float() - other.float()).abs().max()) / scale)
    return same, len(ours), worst


# ---------------------------------------------------------------------------------------------
# Report


def machine(rows: list[dict[str, Any]]) -> dict[str, str]:
    imported = next((r for r in rows if r["kind"] == "import"), {})
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    total = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    disk = shutil.disk_usage(Path(__file__).parent)
    return {"cpu": f"{cpu}, {os.cpu_count()} cores", "memory": f"{total / 1024 / 1024:.0f} GiB",
            "disk": f"local, {disk.total / 2**30:.0f} GiB", "python": platform.python_version(),
            "torch": f"{imported.get('torch', '?')} (CUDA build; CPU used), BLAS {imported.get('blas', '?')}",
            "os": f"{platform.system()} {platform.release()}"}


def median(rows: list[dict[str, Any]], kind: str, key: str) -> float:
    return statistics.median(r[key] for r in rows if r["kind"] == kind)


def render(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    kinds = [k for k in (*RUNS, "import") if any(r["kind"] == k for r in rows)]
    del info
    lines = [
        "| run | work time (s) | process wall (s) | CPU time (s) | peak RSS (MiB) | peak anonymous RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    labels = {"engine": "privatefm-merge engine", "peft": "PEFT merge_and_unload + save_pretrained",
              "engine-replay": f"engine, replay: {REPLAY_ADAPTERS} incremental adapters in one pass",
              "peft-replay": f"PEFT, replay: {REPLAY_ADAPTERS} x (from_pretrained + merge_and_unload), then save",
              "floor": "floor: copy + sha256 (one thread)",
              "floor-pipelined": "floor, pipelined: read, then sha256 + write on a 2nd thread",
              "import": "(fixed cost: python + torch + engine imported)"}
    for kind in kinds:
        lines.append(f"| {labels[kind]} | {median(rows, kind, 'work_seconds'):.2f} | "
                     f"{median(rows, kind, 'wall_seconds'):.2f} | {median(rows, kind, 'cpu_seconds'):.2f} | "
                     f"{median(rows, kind, 'peak_rss_mib'):.0f} | "
                     f"{median(rows, kind, 'peak_anon_mib'):.0f} |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    out = []
    kinds = {r["kind"] for r in rows}

    def ratio(a: str, b: str, key: str = "work_seconds") -> float:
        return median(rows, a, key) / median(rows, b, key)

    def verdict(value: float, limit: float) -> str:
        return "met" if value <= limit else "missed"

    if {"engine", "floor"} <= kinds:
        r = ratio("engine", "floor")
        out.append(f"- engine / floor (work time): **{r:.2f}x** (target <= 1.3x: {verdict(r, 1.3)})")
        out.append(f"- engine / floor (process wall time, torch's import included): "
                   f"{ratio('engine', 'floor', 'wall_seconds'):.2f}x")
    if {"engine-replay", "floor"} <= kinds:
        r = ratio("engine-replay", "floor")
        out.append(f"- {REPLAY_ADAPTERS}-adapter replay / floor (work time): **{r:.2f}x** "
                   f"(target <= 1.5x: {verdict(r, 1.5)})")
    if {"engine-replay", "engine"} <= kinds:
        out.append(f"- {REPLAY_ADAPTERS}-adapter replay / one merge (work time): "
                   f"{ratio('engine-replay', 'engine'):.2f}x ({REPLAY_ADAPTERS} merges one at a time: "
                   f"{REPLAY_ADAPTERS}x)")
    if {"engine", "floor-pipelined"} <= kinds:
        out.append(f"- engine / pipelined floor (work time): {ratio('engine', 'floor-pipelined'):.2f}x")
    if {"engine", "peft"} <= kinds:
        out.append(f"- PEFT / engine: **{ratio('peft', 'engine'):.2f}x** the engine's work time, "
                   f"{ratio('peft', 'engine', 'wall_seconds'):.2f}x its process wall time")
        peft_rss = median(rows, "peft", "peak_rss_mib")
        out.append(f"- peak RSS, PEFT / engine: {peft_rss / median(rows, 'engine', 'peak_rss_mib'):.1f}x")
    if {"engine-replay", "peft-replay"} <= kinds:
        out.append(f"- PEFT replay / engine replay: **{ratio('peft-replay', 'engine-replay'):.2f}x** the "
                   f"engine's work time, {ratio('peft-replay', 'engine-replay', 'wall_seconds'):.2f}x its "
                   "process wall time")
    for kind in ("engine", "engine-replay"):
        if kind not in kinds:
            continue
        limit = 2 * info["largest_tensor_mib"] + 400
        rss = median(rows, kind, "peak_rss_mib")
        anon = median(rows, kind, "peak_anon_mib")
        line = (f"- {kind} peak RSS {rss:.0f} MiB, peak anonymous RSS {anon:.0f} MiB (2 x largest tensor + 400 = "
                f"{limit:.0f} MiB)")
        if "import" in kinds:
            line += f"; above the fixed cost of importing torch ({median(rows, 'import', 'peak_rss_mib'):.0f} MiB): "
            line += f"{rss - median(rows, 'import', 'peak_rss_mib'):.0f} MiB"
        out.append(line)
    for key, label in (("identical", "engine output vs PEFT output"),
                       ("identical_replay", "engine replay vs PEFT replay (PEFT rounds to bf16 after every "
                                            "adapter, the engine once)")):
        if info.get(key) is not None:
            same, total, worst = info[key]
            out.append(f"- {label}: {same}/{total} tensors bit-identical; largest difference "
                       f"{worst:.2e} x the tensor's largest weight")
    return out


def run_child(kind: str, first: str, second: str) -> str:
    """Helpers that need torch run in a child too: the parent stays small, and a child forked
    from a small parent starts small (ru_maxrss counts the pre-exec image)."""
    proc = subprocess.run([sys.executable, __file__, "--child", kind, first, second, "-"], check=True,
                          stdout=subprocess.PIPE, text=True)
    return proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "privatefm-bench")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                        help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--once", default="", help="comma-separated runs measured in the first repetition only")
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    parser.add_argument("--no-docs", action="store_true", help="print the results, do not write the docs")
    parser.add_argument("--keep-inputs", action="store_true",
                        help="keep the generated checkpoint for next time")
    args = parser.parse_args()

    if args.child:
        kind, base, adapter, out = args.child
        if kind == "generate":
            generate_inputs(Path(base), adapter)
            return 0
        if kind == "generate-replay":
            generate_replay(Path(base), adapter)
            return 0
        if kind == "compare":
            print(json.dumps(compare_outputs(Path(base), Path(adapter))))
            return 0
        print(json.dumps(CHILDREN[kind](Path(base), Path(adapter), Path(out))))
        return 0

    runs = [r for r in args.runs.split(",") if r]
    args.work.mkdir(parents=True, exist_ok=True)
    base, adapter, marker = input_paths(args.work, args.shape)
    if not marker.exists():  # in a child: the parent stays small, so children start small
        print(f"generating inputs in {args.work} ...", file=sys.stderr)
        run_child("generate", str(args.work), args.shape)
    once = {r for r in args.once.split(",") if r}
    if {"engine-replay", "peft-replay"} & set(runs) and not (replay_dir(args.work, args.shape) / ".ready").exists():
        print(f"generating {REPLAY_ADAPTERS} incremental adapters ...", file=sys.stderr)
        run_child("generate-replay", str(args.work), args.shape)
    shapes = tensor_shapes(SHAPES[args.shape])
    params = sum(math.prod(d) for _, d in shapes)
    largest = max(2 * math.prod(d) for _, d in shapes) / MiB
    base_bytes = sum(p.stat().st_size for p in base.iterdir())
    info: dict[str, Any] = {"shape": args.shape, "params": params, "largest_tensor_mib": largest,
                            "base_bytes": base_bytes, "shards": len(list(base.glob("*.safetensors"))),
                            "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
                            "identical": None, "identical_replay": None, "once": sorted(once)}
    rows: list[dict[str, Any]] = []
    info["load_before"] = os.getloadavg()
    try:
        rows.append(measure("import", base, adapter, args.work / "out-import"))
        compared = {"identical": ("engine", "peft"), "identical_replay": ("engine-replay", "peft-replay")}
        keep = {kind for pair in compared.values() if set(pair) <= set(runs) for kind in pair}
        for rep in range(args.reps):
            for kind in runs:
                if rep and kind in once:
                    continue
                row = measure(kind, base, adapter, args.work / f"out-{kind}")
                rows.append(row)
                print(f"rep {rep + 1} {kind}: {json.dumps(row)}", file=sys.stderr)
                if rep or kind not in keep:  # outputs are large: keep only those compared below
                    shutil.rmtree(args.work / f"out-{kind}", ignore_errors=True)
            if rep == 0:
                for key, (ours, theirs) in compared.items():
                    if {ours, theirs} <= set(runs):
                        result = run_child("compare", str(args.work / f"out-{ours}"), str(args.work / f"out-{theirs}"))
                        info[key] = tuple(json.loads(result))
                        print(f"{key}: {info[key]}", file=sys.stderr)
                        shutil.rmtree(args.work / f"out-{ours}", ignore_errors=True)
                        shutil.rmtree(args.work / f"out-{theirs}", ignore_errors=True)
    finally:
        for kind in (*RUNS, "import"):
            shutil.rmtree(args.work / f"out-{kind}", ignore_errors=True)
        if not args.keep_inputs:
            shutil.rmtree(args.work, ignore_errors=True)

    info["load_after"] = os.getloadavg()
    table = render(rows, info)
    summary = "\n".join(targets(rows, info))
    print(table)
    print(summary)
    if not args.no_docs:
        write_docs(args.docs, table, summary, info, rows, args, once)
    return 0


def _phases(rows: list[dict[str, Any]], kind: str, keys: tuple[str, ...]) -> str:
    chosen = [r for r in rows if r["kind"] == kind]
    if not chosen:
        return "n/a"
    return ", ".join(f"{k.removesuffix('_seconds')} {statistics.median(r[k] for r in chosen):.2f} s" for k in keys)


ENGINE_PHASES = ("plan_seconds", "stream_seconds", "read_seconds", "compute_seconds", "wait_for_writer_seconds",
                 "commit_seconds")
PEFT_PHASES = ("load_seconds", "merge_seconds", "save_seconds")
NOTES_MARKER = "<!-- notes: kept across regenerations -->"


def write_docs(path: Path, table: str, summary: str, info: dict[str, Any], rows: list[dict[str, Any]],
               args: argparse.Namespace, once: set[str]) -> None:
    """Replace this shape's section of the docs (between its markers); keep the other shapes'
    sections and the notes after ``NOTES_MARKER``."""
    env = machine(rows)
    measured = {"results": rows, "info": info, "machine": env}
    phases = "; ".join(f"{kind}: {_phases(rows, kind, keys)}" for kind, keys in (
        ("engine", ENGINE_PHASES), ("engine-replay", ENGINE_PHASES), ("peft", PEFT_PHASES),
        ("peft-replay", PEFT_PHASES)) if any(r["kind"] == kind for r in rows))
    repetitions = f"{args.reps} repetitions, interleaved, medians reported"
    if once:
        repetitions += f" ({', '.join(sorted(once))}: first repetition only)"
    section = SECTION.format(
        machine="\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n- load average (1, 5, 15 min) before / "
        f"after the runs: {fmt_load(info['load_before'])} / {fmt_load(info['load_after'])} (other work shared "
        "the machine when above ~0.3)",
        shape=info["shape"], params=info["params"] / 1e9, base_gib=info["base_bytes"] / 2**30,
        shards=info["shards"], largest=info["largest_tensor_mib"], adapter_mib=info["adapter_bytes"] / MiB,
        repetitions=repetitions, table=table, summary=summary, phases=phases or "n/a",
        date=time.strftime("%Y-%m-%d", time.gmtime()),
        replay=f"; the replay log holds {REPLAY_ADAPTERS} such adapters, marked incremental"
        if any(r["kind"].endswith("-replay") for r in rows) else "",
        raw=json.dumps(measured, indent=1, default=str),
    )
    old = path.read_text() if path.exists() else ""
    head, _, notes = old.partition(NOTES_MARKER)
    sections = {m[1]: m[0] for m in re.finditer(r"<!-- section: (\S+) -->\n.*?<!-- end section: \1 -->", head, re.S)}
    sections[info["shape"]] = f"<!-- section: {info['shape']} -->\n{section}<!-- end section: {info['shape']} -->"
    body = "\n\n".join(sections[name] for name in SHAPES if name in sections)
    path.write_text(HEADER + "\n" + body + "\n\n" + NOTES_MARKER + notes)


def fmt_load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


HEADER = """# Merge engine benchmark

Generated by `benchmarks/merge_bench.py`, one section per model shape (each replaced when its
shape is rerun). Rerun with

```
.venv/bin/python benchmarks/merge_bench.py            # llama-3.2-1b; about 5 minutes here; ~8 GB of free disk
.venv/bin/python benchmarks/merge_bench.py --shape tinyllama-1.1b \\
    --runs engine,engine-replay,floor,floor-pipelined,peft,peft-replay --once peft-replay
.venv/bin/python benchmarks/merge_bench.py --shape llama-2-7b --runs engine,peft,floor --reps 1  # 40 GB disk, 14 GB RAM
```

## Method

Each run is a fresh subprocess. Inputs and outputs are on the same local disk; the inputs are in
the page cache after the first run (where they fit), for every contender alike; `sync` runs
before each run and nothing is fsync'd.

- **engine**: `merge_checkpoint(base, adapter, out, device=cpu)`: stream, merge, sha256, write, manifest.
- **engine, replay**: the same with an adapter log of 10 incremental adapters (r=16 each, with a
  `privatefm.json` sidecar), folded in one pass: `merge_checkpoint(base, [a1 … a10], out)`.
- **PEFT**: `LlamaForCausalLM.from_pretrained(dtype=bfloat16)`, `PeftModel.from_pretrained`,
  `merge_and_unload()`, `save_pretrained(max_shard_size="1GB")` (no hashing).
- **PEFT, replay**: the same model, then for each of the 10 adapters in turn
  `PeftModel.from_pretrained(model, a).merge_and_unload()`, then one `save_pretrained`.
- **floor**: read every base file in 16 MiB chunks, sha256 it, write it (one thread): the least
  any merge has to do.
- **floor, pipelined**: the same bytes, read into reused buffers on one thread and hashed +
  written on another.
- *work time* is measured inside the child after its imports; *process wall* is the whole
  subprocess, including starting Python and importing torch/transformers; *CPU time* is the
  child's user + system time (2 cores: up to twice the wall time).
- *peak RSS* is `ru_maxrss` from `wait4`; it includes the pages of shared libraries the process
  touched (CUDA-enabled torch maps a lot). *Peak anonymous RSS* is the maximum `RssAnon` polled
  from `/proc` every 20 ms: the process's own heap and buffers.
- Engine phases: `stream` = read + hand chunks to the compute threads + wait for a free buffer
  (`wait_for_writer`: the merge or the hash/write threads are behind), on the main thread;
  `compute` is the time spent merging, summed over the compute threads (so it can exceed
  `stream`).
"""

SECTION = """## {shape}

Generated on {date}; {repetitions}.

- Synthetic `{shape}`-shaped checkpoint, {params:.2f}B parameters, bf16, random weights, generated
  locally: {base_gib:.2f} GiB in {shards} safetensors shards plus `model.safetensors.index.json` and
  `config.json`. Largest tensor: {largest:.0f} MiB (the embedding).
- PEFT LoRA adapter, r=16, lora_alpha=32, on q/k/v/o/gate/up/down of every layer, float32
  ({adapter_mib:.0f} MiB){replay}.

Machine:

{machine}

{table}

{summary}

Phases (median): {phases}.

<details><summary>Raw measurements</summary>

```json
{raw}
```

</details>

"""


if __name__ == "__main__":
    sys.exit(main())
