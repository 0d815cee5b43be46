"""Kafka's and S3Proxy's jars, fetched once with mvn from Maven Central into a cache outside the repo, and
the Java that runs them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from streams.locks import exclusive
from streams.stack.common import StackError, cache_dir, require, say

KAFKA_VERSION = os.environ.get("IMAGEFORK_KAFKA_VERSION", "4.1.1")
S3PROXY_VERSION = os.environ.get("IMAGEFORK_S3PROXY_VERSION", "2.6.0")
LOG4J_VERSION = "2.24.3"

# --- fetching ----------------------------------------------------------------
_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>imagefork.stack</groupId><artifactId>{name}</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{deps}
  </dependencies>
</project>
"""


_DEP = "    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"


COMPONENTS = {
    "kafka": [("org.apache.kafka", "kafka_2.13", KAFKA_VERSION),
              ("org.apache.logging.log4j", "log4j-slf4j-impl", LOG4J_VERSION)],
    "s3proxy": [("org.gaul", "s3proxy", S3PROXY_VERSION)],
    # Kafka's command-line tools (kafka-topics.sh), for the Kafka image only (streams/stack/images.py)
    "kafka-tools": [("org.apache.kafka", "kafka-tools", KAFKA_VERSION)],
}


# what a first fetch says it brings: the jars of each (43 MB each for Kafka 4.1.1 and S3Proxy 2.6.0);
# the very first mvn run also puts Maven's own plugins in ~/.m2 (some 106 MB there in all, about a
# minute on a cold machine)
LABELS = {"kafka": f"Kafka {KAFKA_VERSION}", "s3proxy": f"S3Proxy {S3PROXY_VERSION}",
          "kafka-tools": f"Kafka's tools {KAFKA_VERSION}"}


ABOUT_MB = {"kafka": 45, "s3proxy": 45, "kafka-tools": 20}


def fetch(component: str) -> Path:
    """The folder of jars for ``component``, fetched from Maven Central on first use."""
    deps = COMPONENTS[component]
    version = "-".join(v for _, _, v in deps)
    libs = cache_dir() / component / version / "libs"
    marker = libs.parent / ".complete"
    if marker.exists():
        return libs
    # two stacks starting at once (two test workers, two `stack up`s) fetch once: the other waits here
    with exclusive(cache_dir() / ".fetch.lock"):  # the mvn runs share ~/.m2 too
        if not marker.exists():
            _fetch(component, libs)
    return libs


def _fetch(component: str, libs: Path) -> None:
    deps = COMPONENTS[component]
    marker = libs.parent / ".complete"
    mvn = require("mvn", "Maven is needed to fetch Kafka and S3Proxy from Maven Central")
    libs.parent.mkdir(parents=True, exist_ok=True)
    if libs.exists():
        shutil.rmtree(libs)
    pom = libs.parent / "pom.xml"
    pom.write_text(_POM.format(name=component, deps="\n".join(_DEP.format(g=g, a=a, v=v) for g, a, v in deps)))
    say(f"fetching {LABELS[component]} from Maven Central with mvn, once: about {ABOUT_MB[component]} MB "
        f"(and Maven's own plugins the first time), kept in {libs.parent} and ~/.m2")
    started = time.monotonic()
    # quiet: mvn prints nothing but its errors (no download progress, no colours)
    proc = subprocess.run([mvn, "-q", "-B", "--no-transfer-progress", "-f", str(pom), "dependency:copy-dependencies",
                           f"-DoutputDirectory={libs}", "-DincludeScope=runtime"],
                          capture_output=True, text=True)
    took = time.monotonic() - started
    if proc.returncode != 0 or not any(libs.glob("*.jar")):
        output = (proc.stdout + proc.stderr).strip()
        log = libs.parent / "mvn.log"
        log.write_text(output + "\n")
        lines = output.splitlines()
        errors = [line for line in lines if line.startswith("[ERROR]")] or lines[-10:]
        for line in errors[:20]:
            print(f"  {line}", file=sys.stderr, flush=True)
        said = "its errors are above, all of its output is in" if errors else "it said nothing; see"
        raise StackError(f"mvn could not fetch {component} ({', '.join(f'{g}:{a}:{v}' for g, a, v in deps)}) "
                         f"in {took:.0f}s (exit code {proc.returncode}): {said} {log}")
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    say(f"fetched {LABELS[component]} in {took:.0f}s")


def java() -> str:
    java = require("java", "Java 17+ is needed to run Kafka and S3Proxy")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    try:
        major = int(out.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        major = 0
    if major and major < 17:
        raise StackError(f"Java 17+ is needed to run Kafka 4, found {out.splitlines()[0]}")
    return java
