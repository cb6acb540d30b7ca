"""The project's images, built from its own Dockerfiles without a registry or a Docker engine, and
imported into the node's containerd.

- **Base.** A Debian bookworm root filesystem with python3, made by ``mmdebstrap`` from the
  machine's own apt sources (about 20 s), committed by buildah as ``BASE``. The Dockerfiles take it
  as ``--build-arg PYTHON_IMAGE``; their default stays the public Python image.
- **Images.** ``buildah bud --isolation chroot --pull-never`` builds ``Dockerfile.operator`` and
  ``Dockerfile.merge``. pip installs from the wheelhouse ``scripts/setup.sh`` fills
  (``~/.cache/privatefm/wheels``, mounted read-only at /wheels), so torch is downloaded once for
  the venv and the image. The sandbox ("pause") image is the base running ``sleep infinity``.
- **Cache.** Each image is tagged with a hash of everything that goes into it (its Dockerfile, the
  files it copies, the base); an image containerd already holds under that tag is not rebuilt, and
  one already exported is only imported. buildah's storage, its temporary files and
  containerd's root live under ``~/.cache/privatefm``.
- **Ahead of the node.** ``privatefm-cluster images`` (``prebuild``) builds what the node's
  containerd has not taken yet and exports it as an OCI layout, with no node running.
  ``scripts/setup.sh`` runs it beside the Go builds when ``PRIVATEFM_PREBUILD_IMAGES=1`` (CI sets
  it): the builds mostly wait on the disk while the compiler keeps the CPUs busy, and the node then
  only imports.
- **Disk.** The merge image is 6.8 GB, all in one layer, and each copy of it is whole. buildah's
  commit holds four: the build container, a temporary tar of its layer, the copy its storage
  receives, and the stored layer (24.4 GiB at the peak, measured). The export is an OCI layout,
  which replaces buildah's copy; containerd then takes two (its content and the unpacked snapshot).
  A build checks the free space first and says what is missing, instead of failing inside
  buildah's commit; older images and exports, and what a failed build left, go first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from privatefm_testing.cluster import CACHE, REPO_ROOT

if TYPE_CHECKING:
    from privatefm_testing.node import Node

log = logging.getLogger("privatefm.images")

IMAGES = CACHE / "images"
WHEELHOUSE = Path(os.environ.get("PRIVATEFM_WHEELHOUSE", CACHE / "wheels"))
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
REPO = "localhost/privatefm"
# Free disk each build needs under IMAGES, in GiB. The merge build was measured taking 24.4 GiB at
# its peak (buildah's commit: the container, two temporary copies of the layer, the stored layer).
DISK_NEEDED_GIB = {"merge": 26, "operator": 2, "pause": 1}
# What the Dockerfiles COPY (kept in step with them; tests/test_packaging.py checks the COPY lines).
BUILD_INPUTS = ("pyproject.toml", "locks/operator.lock", "locks/merge.lock", "README.md", "operator", "merge_image")


def buildah(*args: str | Path, capture: bool = True) -> str:
    cmd = ["buildah", "--root", str(IMAGES / "buildah" / "root"), "--runroot", str(IMAGES / "buildah" / "run"),
           "--storage-driver", "overlay", *map(str, args)]
    # buildah writes a commit's layer to a temporary file first: by default in /var/tmp, which may
    # be small or memory-backed. Beside its storage, it has the same disk as the rest.
    tmp = IMAGES / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=capture, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[7:9])} failed ({proc.returncode}):\n{(proc.stderr or '')[-4000:]}")
    return (proc.stdout or "").strip()


def apt_sources() -> Path:
    """The machine's own Debian sources, which mmdebstrap reads as its mirror list."""
    for candidate in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if candidate.exists() and candidate.read_text().strip():
            return candidate
    raise RuntimeError("no Debian apt sources found (/etc/apt/sources.list.d/debian.sources)")


def tree_hash(paths: tuple[str, ...], *extra: str) -> str:
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode() + b"\0")
    for name in paths:
        root = REPO_ROOT / name
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(REPO_ROOT)
            if "__pycache__" in rel.parts or rel.suffix == ".pyc" or any(p.endswith(".egg-info") for p in rel.parts):
                continue
            digest.update(str(rel).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def base_reference() -> str:
    key = hashlib.sha256(f"{SUITE} {' '.join(BASE_PACKAGES)} {apt_sources().read_text()}".encode()).hexdigest()[:16]
    return f"{REPO}/debian-python:{SUITE}-{key}"


def built() -> set[str]:
    return set(buildah("images", "--format", "{{.Name}}:{{.Tag}}").split())


def ensure_base(ref: str) -> None:
    """The Debian base image in buildah's storage."""
    if ref in built():
        return
    IMAGES.mkdir(parents=True, exist_ok=True)
    rootfs = IMAGES / "base-rootfs.tar"
    log.info("mmdebstrap %s with %s", SUITE, ", ".join(BASE_PACKAGES))
    subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                    SUITE, str(rootfs), str(apt_sources())], check=True)
    container = buildah("from", "scratch")
    try:
        buildah("add", container, rootfs, "/")
        buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env", "LANG=C.UTF-8", "--cmd", '["python3"]', container)
        buildah("commit", "--quiet", container, ref)
    finally:
        buildah("rm", container)
        rootfs.unlink(missing_ok=True)


def build_dockerfile(dockerfile: str, base: str, ref: str) -> None:
    """Builds a Dockerfile from the repo on ``base`` as ``ref``."""
    if not any(WHEELHOUSE.glob("*.whl")):
        raise RuntimeError(f"no wheels in {WHEELHOUSE}: scripts/setup.sh fills it")
    # What an interrupted or failed build left (its working containers, buildah's temporary blobs)
    # would hold gigabytes of the disk this one needs.
    buildah("rm", "--all")
    shutil.rmtree(IMAGES / "tmp", ignore_errors=True)
    log.info("buildah bud %s -> %s", dockerfile, ref)
    started = time.monotonic()
    buildah("bud", "--isolation", "chroot", "--pull-never", "--layers=false", "--quiet", "-f", REPO_ROOT / dockerfile,
            "--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", "PIP_NO_INDEX=1",
            "--build-arg", "PIP_FIND_LINKS=/wheels", "--volume", f"{WHEELHOUSE}:/wheels:ro", "-t", ref, REPO_ROOT)
    log.info("built %s in %.0fs", ref, time.monotonic() - started)


def build_pause(base: str, ref: str) -> None:
    """The pod sandbox image: the base, sleeping. containerd's config names it (``SANDBOX_IMAGE``)."""
    container = buildah("from", "--pull-never", base)
    try:
        buildah("config", "--entrypoint", '["/bin/sleep", "infinity"]', "--cmd", "[]", "--user", "65535:65535",
                container)
        buildah("commit", "--quiet", container, ref)
    finally:
        buildah("rm", container)


def free_gib() -> float:
    IMAGES.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(IMAGES).free / 2**30


def check_disk(name: str, ref: str) -> None:
    needed, free = DISK_NEEDED_GIB[name], free_gib()
    if free < needed:
        raise RuntimeError(
            f"building {ref} needs about {needed} GiB free under {IMAGES}, and {free:.1f} GiB are free "
            "(the merge image is 6.8 GB in one layer, and buildah's commit holds four copies of it)")


def export(ref: str, keep_in_buildah: bool) -> None:
    """Writes an image from buildah's storage as an uncompressed OCI layout (the layout and
    containerd sit on this disk, and compressing the merge image's gigabytes would cost minutes).
    buildah's copy of an application image is dropped then: containerd takes it from the layout."""
    layout = layout_of(ref)
    partial = layout.with_name(layout.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    buildah("push", "--quiet", "--disable-compression", ref, f"oci:{partial}:{ref}")
    partial.rename(layout)
    if not keep_in_buildah:
        buildah("rmi", ref)


def import_into(node: Node, ref: str) -> None:
    """Streams the exported layout of ``ref`` into the node's containerd (``ctr images import``),
    then removes the layout."""
    layout = layout_of(ref)
    try:
        tar = subprocess.Popen(["tar", "-C", str(layout), "-cf", "-", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(["ctr", "--address", node.sock, "-n", "k8s.io", "images", "import", "-"],
                                      stdin=tar.stdout, capture_output=True, text=True, timeout=1200)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"ctr images import {ref} failed ({imported.returncode}, tar {tar.returncode}): "
                               f"{imported.stderr[-2000:]}")
        mark_imported(ref)
    finally:
        shutil.rmtree(layout, ignore_errors=True)


def wanted() -> dict[str, str]:
    """The reference of each image: a hash of its Dockerfile, what it copies, and the base."""
    from privatefm_testing.node import SANDBOX_IMAGE

    base = base_reference()
    return {"base": base, "pause": SANDBOX_IMAGE,
            "operator": f"{REPO}/operator:{tree_hash(('Dockerfile.operator', '.dockerignore', *BUILD_INPUTS), base)}",
            "merge": f"{REPO}/merge:{tree_hash(('Dockerfile.merge', '.dockerignore', *BUILD_INPUTS), base)}"}


def ensure_images(node: Node) -> dict[str, str]:
    """Makes sure the node's containerd holds the pause, operator and merge images, building,
    exporting and importing whichever it lacks; returns their references."""
    need_builders()
    refs = wanted()
    base = refs.pop("base")
    # Older images go first: an old merge image is two more copies on the disk the build needs.
    prune(node, set(refs.values()))
    drop_stale(base, refs)
    have = set(node.ctr("images", "ls", "-q").stdout.split())
    for name, ref in refs.items():
        if ref in have:
            mark_imported(ref)
            continue
        if not layout_of(ref).exists():
            if ref not in built():
                build(name, base, ref)
            export(ref, keep_in_buildah=name == "pause")
        import_into(node, ref)
    prune(node, set(refs.values()))
    return refs


def prebuild(reserve_gib: float = 0) -> list[str]:
    """Builds and exports each image the node's containerd has not taken yet, with no node running,
    so that the node only imports; returns what it made. containerd cannot be asked without a node,
    so what it took is read from the markers ``import_into`` leaves; where they are wrong, the node
    builds what it lacks. An image whose build would leave less than ``reserve_gib`` free (for
    what runs beside it) is left to the node."""
    need_builders()
    refs = wanted()
    base = refs.pop("base")
    drop_stale(base, refs)
    made = []
    for name, ref in refs.items():
        if not imported_marker(ref).exists() and not layout_of(ref).exists():
            if ref not in built():
                if free_gib() < DISK_NEEDED_GIB[name] + reserve_gib:
                    log.warning("not building %s now: %.1f GiB free, and it needs %d GiB besides the %.0f GiB "
                                "kept for what runs beside it; the node will build it", ref, free_gib(),
                                DISK_NEEDED_GIB[name], reserve_gib)
                    continue
                build(name, base, ref)
            export(ref, keep_in_buildah=name == "pause")
            made.append(ref)
    return made


def need_builders() -> None:
    if not shutil.which("buildah") or not shutil.which("mmdebstrap"):
        raise RuntimeError("building images needs Debian's buildah and mmdebstrap; scripts/setup.sh installs them")


def build(name: str, base: str, ref: str) -> None:
    ensure_base(base)
    check_disk(name, ref)
    if name == "pause":
        build_pause(base, ref)
    else:
        build_dockerfile(f"Dockerfile.{name}", base, ref)


def drop_stale(base: str, refs: dict[str, str]) -> None:
    """What a failed build left, and older images and exports of this project (a merge image is
    gigabytes), leave buildah's storage and the exports first."""
    buildah("rm", "--all")
    keep = {base, *refs.values()}
    for stale in sorted(r for r in built() if r.startswith(f"{REPO}/") and r not in keep):
        buildah("rmi", stale)
    wanted_layouts = {layout_of(ref).name for ref in refs.values()}
    for path in (IMAGES / "layouts").glob("*"):
        if path.name not in wanted_layouts:
            shutil.rmtree(path, ignore_errors=True)


def _key(ref: str) -> str:
    return hashlib.sha256(ref.encode()).hexdigest()[:32]


def layout_of(ref: str) -> Path:
    """The image exported as an uncompressed OCI layout, ready for ``ctr images import``."""
    return IMAGES / "layouts" / _key(ref)


def imported_marker(ref: str) -> Path:
    """There when the node's containerd (whose root is in the cache too) took ``ref``."""
    return IMAGES / "imported" / _key(ref)


def mark_imported(ref: str) -> None:
    imported_marker(ref).parent.mkdir(parents=True, exist_ok=True)
    imported_marker(ref).touch()


def prune(node: Node, keep: set[str]) -> None:
    """Removes this project's older images from containerd (a merge image is gigabytes); containerd
    then collects their content and snapshots. Digest-named entries are the same images by digest."""
    listing = node.ctr("images", "ls").stdout.splitlines()[1:]
    keep_digests = {line.split()[2] for line in listing if line.split()[0] in keep}
    for line in listing:
        name, digest = line.split()[0], line.split()[2]
        stale = name.startswith(f"{REPO}/") and name not in keep
        stale_alias = name.startswith("sha256:") and digest not in keep_digests
        if stale or stale_alias:
            node.ctr("images", "rm", "--sync", name, check=False)
            imported_marker(name).unlink(missing_ok=True)
