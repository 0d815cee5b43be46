"""The project's Docker images, built locally from the registries we reach (issue 12).

No image registry is needed: the base is a Debian root filesystem made with ``debootstrap`` from
Debian's mirror and loaded with ``docker import``; Java and Python come from Debian's packages (apt
inside ``docker build --network host``); Kafka's and S3Proxy's jars are the local stack's, fetched with
mvn from Maven Central (``streams.stack.local.fetch``); the app is the package installed from its wheel
with pip from PyPI (the ``Dockerfile``, with ``PYTHON_IMAGE`` set to the local Python image).

    python -m streams.stack.images          # build what is missing (``make images``), print each tag
    python -m streams.stack.images --list   # the tags, one a line, built or not

An image whose tag exists is reused unless what it is built from changed (its label ``imagefork.source``
holds their hash: the files under docker/, the versions, the app's sources), so a change rebuilds it. Every version is pinned here or in the local stack.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streams.stack import local
from streams.errors import ImageforkError

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "docker"

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("IMAGEFORK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
JAVA_PACKAGE = "openjdk-17-jre-headless"

BASE_IMAGE = f"imagefork/debian:{DEBIAN_SUITE}"
JAVA_IMAGE = f"imagefork/java:17-{DEBIAN_SUITE}"
PYTHON_IMAGE = f"imagefork/python:3.11-{DEBIAN_SUITE}"
KAFKA_IMAGE = f"imagefork/kafka:{local.KAFKA_VERSION}"
S3PROXY_IMAGE = f"imagefork/s3proxy:{local.S3PROXY_VERSION}"
APP_IMAGE = "imagefork/app:local"
# what the app image is built from: a change to any of these rebuilds it
APP_SOURCES = ("Dockerfile", "pyproject.toml", "constraints.txt", "README.md", "schemas", "streams")


class ImageError(ImageforkError, RuntimeError):
    """One line saying what is missing or what failed."""


def _say(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


def docker_env() -> dict[str, str]:
    # the classic builder: `--network host` and no frontend image to pull
    return {**os.environ, "DOCKER_BUILDKIT": "0"}


def docker(*args: str, check: bool = True, capture: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], env=docker_env(), text=True,
                          capture_output=capture, **kw)
    if check and proc.returncode != 0:
        out = ((proc.stdout or "") + (proc.stderr or "")).strip()
        raise ImageError(f"docker {' '.join(args[:3])} ... failed (exit {proc.returncode}): {out[-800:]}")
    return proc


def docker_answers() -> str | None:
    """None when a Docker engine answers, else why not (one line)."""
    if not shutil.which("docker"):
        return "the docker client is not installed"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info did not answer ({exc})"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine answers ({last})"
    return None


def image_label(tag: str, label: str) -> str | None:
    """The label's value, '' when the image has no such label, None when there is no such image."""
    proc = docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{label}"}}}}', tag, check=False)
    if proc.returncode != 0:
        return None
    value = proc.stdout.strip()
    return "" if value == "<no value>" else value


def _build(tag: str, context: Path, *, dockerfile: Path | None = None, args: dict[str, str] | None = None) -> None:
    cmd = ["build", "--network", "host", "-t", tag, "--label", f"imagefork.built={time.strftime('%Y-%m-%d')}",
           "--label", f"imagefork.source={SOURCE_HASH[tag]()}"]
    for k, v in (args or {}).items():
        cmd += ["--build-arg", f"{k}={v}"]
    if dockerfile:
        cmd += ["-f", str(dockerfile)]
    log = local.cache_dir() / "docker" / f"build-{tag.replace('/', '_').replace(':', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.run(["docker", *cmd, str(context)], env=docker_env(), stdout=out,
                              stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        for line in tail:
            print(f"  {line}", file=sys.stderr)
        raise ImageError(f"docker build of {tag} failed (exit {proc.returncode}); whole log: {log}")


def build_base() -> None:
    """Debian's minimal root filesystem (debootstrap, from Debian's mirror), imported as BASE_IMAGE."""
    debootstrap = shutil.which("debootstrap") or ("/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists()
                                                   else None)
    if not debootstrap:
        raise ImageError("debootstrap is not installed (apt-get install debootstrap): it makes the Debian base")
    if os.geteuid() != 0:
        raise ImageError("debootstrap needs root to make the Debian base image")
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=local.cache_dir() / "docker"))
    try:
        log = work.parent / "debootstrap.log"
        with open(log, "w") as out:
            proc = subprocess.run([debootstrap, "--variant=minbase", DEBIAN_SUITE, str(work / "rootfs"), DEBIAN_MIRROR],
                                  stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise ImageError(f"debootstrap {DEBIAN_SUITE} from {DEBIAN_MIRROR} failed; see {log}")
        rootfs = work / "rootfs"
        for junk in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            junk.unlink()
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
        # as Debian's own images: no recommends, no documentation, nothing of the build host
        (rootfs / "etc/apt/apt.conf.d/90imagefork").write_text(
            'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n')
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["docker", "import", "--change", 'CMD ["/bin/bash"]',
                              "--change", f"LABEL imagefork.built={time.strftime('%Y-%m-%d')}",
                              "--change", f"LABEL imagefork.debian={DEBIAN_SUITE}",
                              "--change", f"LABEL imagefork.source={SOURCE_HASH[BASE_IMAGE]()}",
                              "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True, text=True, env=docker_env())
        tar.stdout.close()
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise ImageError(f"docker import of the {DEBIAN_SUITE} root filesystem failed: {imp.stderr.strip()[-400:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _jar_context(component: str, folder: str) -> Path:
    """A build context: docker/<folder>/ plus the component's jars (libs/) from the local stack's cache."""
    libs = local.fetch(component)
    ctx = Path(tempfile.mkdtemp(prefix=f"ctx-{folder}-", dir=local.cache_dir() / "docker"))
    shutil.copytree(DOCKER_DIR / folder, ctx, dirs_exist_ok=True)
    shutil.copytree(libs, ctx / "libs")
    return ctx


def build_java() -> None:
    _build(JAVA_IMAGE, DOCKER_DIR / "java", args={"BASE_IMAGE": BASE_IMAGE, "JAVA_PACKAGE": JAVA_PACKAGE})


def build_kafka() -> None:
    ctx = _jar_context("kafka", "kafka")
    try:
        broker = {p.name for p in (ctx / "libs").iterdir()}
        (ctx / "tools-libs").mkdir()
        for jar in local.fetch("kafka-tools").glob("*.jar"):
            if jar.name not in broker:
                shutil.copy(jar, ctx / "tools-libs" / jar.name)
        _build(KAFKA_IMAGE, ctx, args={"JAVA_IMAGE": JAVA_IMAGE, "KAFKA_VERSION": local.KAFKA_VERSION})
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def build_s3proxy() -> None:
    ctx = _jar_context("s3proxy", "s3proxy")
    try:
        _build(S3PROXY_IMAGE, ctx, args={"JAVA_IMAGE": JAVA_IMAGE, "S3PROXY_VERSION": local.S3PROXY_VERSION})
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def build_python() -> None:
    ctx = Path(tempfile.mkdtemp(prefix="ctx-python-", dir=local.cache_dir() / "docker"))
    try:
        shutil.copytree(DOCKER_DIR / "python", ctx, dirs_exist_ok=True)
        (ctx / "ca").mkdir()
        # the building host's own extra CAs (a proxy's, a company's): pip inside the build trusts them too
        for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy(crt, ctx / "ca" / crt.name)
        _build(PYTHON_IMAGE, ctx, args={"BASE_IMAGE": BASE_IMAGE})
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def build_app() -> None:
    _build(APP_IMAGE, ROOT, args={"PYTHON_IMAGE": PYTHON_IMAGE})


def _id(tag: str) -> str:
    """The image's id ('' when there is none): a rebuilt parent makes its children's hashes change."""
    proc = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _tree_hash(*paths: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                     if p.is_file() and "__pycache__" not in p.parts)
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def app_source_hash() -> str:
    return _tree_hash(*(ROOT / name for name in APP_SOURCES), extra=_id(PYTHON_IMAGE))


# in build order: tag, builder, and the hash of what it is built from (its label imagefork.source): an
# image whose tag exists with the same hash is reused, any other is built again
STEPS = [
    (BASE_IMAGE, build_base, lambda: _tree_hash(extra=f"{DEBIAN_SUITE} {DEBIAN_MIRROR}")),
    (JAVA_IMAGE, build_java, lambda: _tree_hash(DOCKER_DIR / "java", extra=f"{_id(BASE_IMAGE)} {JAVA_PACKAGE}")),
    (KAFKA_IMAGE, build_kafka, lambda: _tree_hash(DOCKER_DIR / "kafka", extra=f"{_id(JAVA_IMAGE)} {local.COMPONENTS['kafka']}"
                                                                              f" {local.COMPONENTS['kafka-tools']}")),
    (S3PROXY_IMAGE, build_s3proxy, lambda: _tree_hash(DOCKER_DIR / "s3proxy",
                                                      extra=f"{_id(JAVA_IMAGE)} {local.COMPONENTS['s3proxy']}")),
    (PYTHON_IMAGE, build_python, lambda: _tree_hash(DOCKER_DIR / "python", extra=_id(BASE_IMAGE))),
    (APP_IMAGE, build_app, app_source_hash),
]
SOURCE_HASH = {tag: source for tag, _, source in STEPS}


def not_current(tag: str) -> str | None:
    """None when the image ``tag`` is built from its sources as they are now (its label imagefork.source is
    their hash, as build_all checks), else why not (one line)."""
    label = image_label(tag, "imagefork.source")
    if label is None:
        return f"{tag} is not built: run make images"
    if label != SOURCE_HASH[tag]():
        return f"{tag} is stale: its sources changed, run make images"
    return None


def build_all(steps=None) -> dict[str, float]:
    """Build each missing (or outdated) image of ``steps`` (default: STEPS, the project's images); the
    seconds each build took ({} when all were there)."""
    why = docker_answers()
    if why:
        raise ImageError(f"{why}: start one (as root: scripts/dockerd.sh start, then export DOCKER_HOST)")
    (local.cache_dir() / "docker").mkdir(parents=True, exist_ok=True)
    took: dict[str, float] = {}
    for tag, builder, fresh in STEPS if steps is None else steps:
        if image_label(tag, "imagefork.source") == fresh():
            _say(f"{tag}: built already")
            continue
        _say(f"{tag}: building")
        started = time.monotonic()
        old = _id(tag)
        builder()
        if old and old != _id(tag):
            docker("rmi", old, check=False)  # the outdated image, unless a container still uses it
        took[tag] = time.monotonic() - started
        _say(f"{tag}: built in {took[tag]:.0f}s")
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streams.stack.images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the tags, one a line, and build nothing")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(tag for tag, _, _ in STEPS))
        return 0
    started = time.monotonic()
    try:
        took = build_all()
    except (ImageError, local.StackError) as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    _say(f"all images ready in {time.monotonic() - started:.0f}s ({len(took)} built)")
    for tag, _, _ in STEPS:
        print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
