"""What ships, with no server: the product wheel's contents, the harness's own package, the images'
build context, and that each image's environment is enough for its package and no more.

The import tests run a subprocess whose meta-path finder refuses every installed top-level module
that the environment in question would not have: for the operator image, anything outside the
dependency closure of the default dependencies (so no torch); for the merge image, anything outside
the closure of the ``merge`` extra (so no kopf, kubernetes, peft or transformers). That is the
image's venv, simulated inside this one.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PRODUCT_PACKAGES = {"privatefm_operator", "privatefm_merge"}
PRODUCT_SCRIPTS = {"privatefm-merge", "privatefm-operator", "privatefm-crdgen"}
HARNESS_SCRIPTS = {"privatefm-cluster", "privatefm-podrunner"}
# What the issue names: never in the merge image, never in the operator image.
NOT_IN_MERGE = {"kopf", "kubernetes", "peft", "transformers", "accelerate", "huggingface_hub", "privatefm_testing"}
NOT_IN_OPERATOR = {"torch", "peft", "transformers", "safetensors", "privatefm_testing"}


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(req).name).lower()


def _build_wheel(src: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


def _entry_points(zf: zipfile.ZipFile) -> dict[str, set[str]]:
    (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
    groups: dict[str, set[str]] = {}
    group = ""
    for line in zf.read(name).decode().splitlines():
        if line.startswith("["):
            group = line.strip("[]")
        elif "=" in line:
            groups.setdefault(group, set()).add(line.split("=")[0].strip())
    return groups


@pytest.fixture(scope="module")
def product_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from exactly what the Dockerfiles copy, in a scratch copy (no build/ in the repo)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("operator", "merge_image"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return _build_wheel(src, tmp_path_factory.mktemp("wheel"))


def test_product_wheel_holds_the_operator_and_the_engine_only(product_wheel: Path) -> None:
    with zipfile.ZipFile(product_wheel) as zf:
        names = zf.namelist()
        tops = {n.split("/")[0] for n in names}
        assert tops == {*PRODUCT_PACKAGES, "privatefm-0.1.0.dist-info"}, tops
        assert not [n for n in names if "privatefm_testing" in n or n.startswith("tests/")]
        assert "privatefm_operator/handlers.py" in names
        assert "privatefm_merge/engine.py" in names
        assert _entry_points(zf) == {"console_scripts": PRODUCT_SCRIPTS}
        meta = zf.read("privatefm-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    requires = [Requirement(line.split(":", 1)[1].strip())
                for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    default = {_name(str(r)) for r in requires if r.marker is None}
    merge = {_name(str(r)) for r in requires if r.marker and r.marker.evaluate({"extra": "merge"})
             and not r.marker.evaluate({"extra": ""})}
    assert "torch" not in default and "kopf" in default
    assert merge == {_name(r) for r in PYPROJECT["optional-dependencies"]["merge"]}


def test_harness_is_its_own_package(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(REPO / "tests" / "support", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheel = _build_wheel(src, tmp_path / "out")
    assert wheel.name.startswith("privatefm_testing-")
    with zipfile.ZipFile(wheel) as zf:
        tops = {n.split("/")[0] for n in zf.namelist() if not n.split("/")[0].endswith(".dist-info")}
        assert tops == {"privatefm_testing"}
        assert _entry_points(zf) == {"console_scripts": HARNESS_SCRIPTS}
    scripts = set(PYPROJECT["scripts"])
    assert scripts == PRODUCT_SCRIPTS, "the product declares only its own console scripts"


# --- what each image's environment needs -----------------------------------------------------


def _third_party_imports(package_dir: Path) -> set[str]:
    mods: set[str] = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m not in PRODUCT_PACKAGES}


def _dists_of(modules: set[str]) -> set[str]:
    owners = metadata.packages_distributions()
    return {_name(d) for m in modules for d in owners.get(m, [m])}


def test_merge_extra_is_exactly_what_the_engine_imports() -> None:
    imported = _dists_of(_third_party_imports(REPO / "merge_image" / "privatefm_merge"))
    declared = {_name(r) for r in PYPROJECT["optional-dependencies"]["merge"]}
    assert declared == imported
    assert not declared & {"kopf", "kubernetes", "peft", "transformers", "accelerate", "huggingface-hub",
                           "safetensors"}


def test_default_dependencies_cover_the_operator_and_carry_no_torch() -> None:
    default = {_name(r) for r in PYPROJECT["dependencies"]}
    assert _dists_of(_third_party_imports(REPO / "operator" / "privatefm_operator")) <= default
    assert not default & {"torch", "peft", "transformers", "safetensors", "accelerate", "huggingface-hub"}
    # The suite's references (peft, transformers) and the harness are test-only.
    test = {_name(r) for r in PYPROJECT["optional-dependencies"]["test"]}
    assert {"peft", "transformers"} <= test


def _closure(requirements: list[str]) -> set[str]:
    """Distribution names needed by ``requirements`` (installed metadata, markers evaluated)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = _name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in metadata.requires(req.name) or []]
    return seen


def _run_without(allowed_requirements: list[str], script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    allowed = _closure(allowed_requirements) | {"pip", "setuptools"}  # every venv has these
    blocked = sorted({m for m, dists in metadata.packages_distributions().items()
                      if not {_name(d) for d in dists} & allowed} - PRODUCT_PACKAGES | {"privatefm_testing"})
    prelude = textwrap.dedent(f"""
        import sys
        BLOCKED = frozenset({blocked!r})
        class Refuse:
            @staticmethod
            def find_spec(name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"{{name}} is not in this image", name=name)
                return None
        sys.meta_path.insert(0, Refuse)
        assert not BLOCKED & set(sys.modules), BLOCKED & set(sys.modules)
    """)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONNOUSERSITE": "1",
           "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'merge_image'}"}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)


def test_operator_imports_without_torch(tmp_path: Path) -> None:
    proc = _run_without(PYPROJECT["dependencies"], """
        import privatefm_operator.handlers, privatefm_operator.__main__, privatefm_operator.crdgen
        import privatefm_operator.storage
        print(sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "peft", "transformers"}))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert _closure(PYPROJECT["dependencies"]).isdisjoint({"torch", "peft", "transformers", "safetensors"})


def test_merge_engine_imports_and_merges_without_operator_deps(tmp_path: Path) -> None:
    """A 4x4 base, a rank-2 LoRA, `privatefm-merge merge` then `verify`: W' = W + (alpha/r) B A."""
    proc = _run_without(PYPROJECT["optional-dependencies"]["merge"], """
        import json, struct
        from pathlib import Path
        import torch
        from privatefm_merge import cli, engine

        def write(path, tensors):
            header, blobs, offset = {}, [], 0
            for name, t in tensors.items():
                data = bytes(t.contiguous().untyped_storage())  # no numpy in the merge image
                header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
                blobs.append(data)
                offset += len(data)
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)
            path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))

        def read(path, name):
            buf = path.read_bytes()
            (n,) = struct.unpack("<Q", buf[:8])
            info = json.loads(buf[8:8 + n])[name]
            start, end = info["data_offsets"]
            data = bytearray(buf[8 + n + start:8 + n + end])
            return torch.frombuffer(data, dtype=torch.float32).reshape(info["shape"])

        torch.manual_seed(0)
        w, a, b = torch.randn(4, 4), torch.randn(2, 4), torch.randn(4, 2)
        base, adapter = Path("base"), Path("adapter")
        base.mkdir(); adapter.mkdir()
        write(base / "model.safetensors", {"model.layers.0.q_proj.weight": w})
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}))
        write(adapter / "adapter_model.safetensors", {
            "base_model.model.model.layers.0.q_proj.lora_A.weight": a,
            "base_model.model.model.layers.0.q_proj.lora_B.weight": b})
        assert cli.main(["merge", "--base", "base", "--adapter", "adapter", "--output", "out", "--device", "cpu"]) == 0
        assert cli.main(["verify", "out"]) == 0
        merged = read(Path("out/model.safetensors"), "model.layers.0.q_proj.weight")
        torch.testing.assert_close(merged, w + 2.0 * (b @ a))
        print("FOREIGN", sorted({m.split(".")[0] for m in sys.modules} & NOT_IN_MERGE))
    """.replace("NOT_IN_MERGE", repr(NOT_IN_MERGE)), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FOREIGN []" in proc.stdout
    assert _closure(PYPROJECT["optional-dependencies"]["merge"]).isdisjoint(
        {"kopf", "kubernetes", "peft", "transformers", "accelerate", "huggingface-hub"})


# --- the images' build context ---------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.merge"])
def test_dockerfiles_copy_only_the_product(dockerfile: str) -> None:
    text = (REPO / dockerfile).read_text()
    copied = {src for line in text.splitlines() if line.startswith("COPY ") and "--from=" not in line
              for src in line.split()[1:-1]}
    kind = dockerfile.split(".")[1]
    assert copied == {"pyproject.toml", f"locks/{kind}.lock", "README.md", "operator", "merge_image"}
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert all(src in allowed or src.split("/")[0] in allowed for src in copied), allowed
    # Every wheel an image installs is checked against its lock's sha256.
    assert f"pip install --require-hashes -r {'/dist/' if kind == 'merge' else 'locks/'}{kind}.lock" in text
    assert re.search(r"^USER 65532:65532$", text, re.M)
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+$", text, re.M), "exact base tag"
    assert json.dumps("privatefm-operator" if "operator" in dockerfile else "privatefm-merge") in text


# ---- the locks (scripts/lock.sh, uv) ---------------------------------------------------------


def _lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """``locks/<name>.lock`` as {distribution: (version, sha256 hashes)}."""
    pins: dict[str, tuple[str, list[str]]] = {}
    text = (REPO / "locks" / f"{name}.lock").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split(" --hash=")
        req = Requirement(requirement)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{name}.lock: {requirement} is not pinned exactly"
        pins[_name(requirement)] = (spec.version, [o.strip() for o in options])
    return pins


LOCKS = ("dev", "operator", "merge", "uv")


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_carries_sha256_hashes_and_no_index(name: str) -> None:
    pins = _lock(name)
    assert pins
    for dist, (_version, hashes) in pins.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), dist
    # No index URL and no registry host: installs use whatever index the machine is configured with.
    assert "://" not in (REPO / "locks" / f"{name}.lock").read_text()


def test_image_locks_pin_the_versions_the_suite_runs() -> None:
    dev = _lock("dev")
    for name in ("operator", "merge"):
        for dist, (version, hashes) in _lock(name).items():
            assert dev[dist][0] == version, f"{name}.lock pins {dist}=={version}, dev.lock {dev[dist][0]}"
            assert set(hashes) == set(dev[dist][1]), f"{name}.lock: {dist} hashes differ from dev.lock"


def _satisfied(requirements: list[str], pins: dict[str, tuple[str, list[str]]], lock: str) -> None:
    for requirement in requirements:
        req = Requirement(requirement)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        assert _name(requirement) in pins, f"{lock}.lock lacks {requirement}: rerun scripts/lock.sh"
        assert req.specifier.contains(pins[_name(requirement)][0], prereleases=True), (requirement, lock)


def test_locks_hold_what_pyproject_declares() -> None:
    """A dependency added to a pyproject.toml without rerunning scripts/lock.sh fails here."""
    harness = tomllib.loads((REPO / "tests" / "support" / "pyproject.toml").read_text())["project"]
    extras = PYPROJECT["optional-dependencies"]
    _satisfied(PYPROJECT["dependencies"], _lock("operator"), "operator")
    _satisfied(extras["merge"], _lock("merge"), "merge")
    _satisfied([*PYPROJECT["dependencies"], *(r for extra in extras.values() for r in extra),
                *harness["dependencies"]], _lock("dev"), "dev")
    versions = (REPO / "scripts" / "versions.env").read_text()
    assert f"UV_VERSION={_lock('uv')['uv'][0]}\n" in versions


def test_image_locks_leave_out_the_other_image() -> None:
    assert not set(_lock("operator")) & {"torch", "peft", "transformers", "safetensors", "triton"}
    assert not set(_lock("merge")) & {"kopf", "kubernetes", "peft", "transformers", "accelerate",
                                      "huggingface-hub", "prometheus-client", "pydantic-settings"}


def test_the_venv_is_exactly_the_dev_lock() -> None:
    """scripts/setup.sh syncs .venv to locks/dev.lock: what runs the suite is what is locked."""
    dev = _lock("dev")
    installed = {_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    local = {"privatefm", "privatefm-testing"}
    assert set(installed) - local <= set(dev), set(installed) - local - set(dev)
    for dist, version in installed.items():
        if dist not in local:
            assert dev[dist][0] == version, dist
    markers_here = [d for d in dev if d not in installed]
    assert markers_here, "every pin applies here: the lock would not be universal"
