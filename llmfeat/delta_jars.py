"""The delta-spark JVM jars: named from the installed pip packages, resolved once by the set-up, found by the
session. Nothing here runs while a job runs, except `local_jars`, which only lists files.

    python -m llmfeat.delta_jars            # what `make setup` runs: Maven copies the jars (cached)
    python -m llmfeat.delta_jars --list     # the jars, comma separated: spark-submit --jars "$(...)"

The artifact is the one delta-spark's own pip_utils names for the installed pyspark and delta-spark
(io.delta:delta-spark_<spark major.minor>_2.13:<delta-spark version>). Maven copies it with its runtime
dependencies into <venv>/share/llmfeat/delta-jars/<artifact>-<version>/, less the ones Spark already ships
(its own copies win on the classpath anyway). A second run finds the folder complete and does nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SCALA = "2.13"
DONE = ".resolved"  # written last: a folder without it is an interrupted resolve, done again
POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>llmfeat</groupId><artifactId>delta-jars</artifactId><version>1</version><packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>io.delta</groupId><artifactId>{artifact}</artifactId><version>{version}</version>
      <exclusions><exclusion><groupId>org.scala-lang</groupId><artifactId>*</artifactId></exclusion></exclusions>
    </dependency>
  </dependencies>
</project>
"""
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"


class DeltaJarsError(RuntimeError):
    pass


def coordinates() -> tuple[str, str]:
    """(artifact, version) of the delta-spark jar matching the installed pyspark and delta-spark."""
    spark = importlib.metadata.version("pyspark")
    delta = importlib.metadata.version("delta-spark")
    major_minor = ".".join(spark.split(".")[:2])
    return f"delta-spark_{major_minor}_{SCALA}", delta


def maven_coordinate() -> str:
    artifact, version = coordinates()
    return f"io.delta:{artifact}:{version}"


def jar_dir() -> Path:
    """Where the set-up puts the jars of the installed versions: in the environment, beside its packages."""
    artifact, version = coordinates()
    return Path(sys.prefix) / "share" / "llmfeat" / "delta-jars" / f"{artifact}-{version}"


def local_jars(folder: str | Path | None = None) -> list[str]:
    """The resolved jars (absolute paths, delta-spark first), or [] when the set-up has not resolved them."""
    path = Path(folder).expanduser() if folder else jar_dir()
    if folder is None and not (path / DONE).exists():
        return []
    jars = sorted(str(p.resolve()) for p in path.glob("*.jar")) if path.is_dir() else []
    return sorted(jars, key=lambda j: "delta-spark_" not in Path(j).name)


def spark_shipped() -> set[str]:
    """Artifact names of the jars inside pyspark (jackson, parquet, hadoop, ...), without their versions."""
    import pyspark

    folder = Path(pyspark.__file__).parent / "jars"
    return {_artifact_name(p.name) for p in folder.glob("*.jar")}


def _artifact_name(filename: str) -> str:
    """jackson-core-2.13.5.jar -> jackson-core; zstd-jni-1.5.7-3.jar -> zstd-jni."""
    parts = filename.removesuffix(".jar").split("-")
    for i, part in enumerate(parts):
        if i and part[:1].isdigit():
            return "-".join(parts[:i])
    return "-".join(parts)


def resolve(mvn: str = "mvn") -> list[str]:
    """Copy the jars with Maven (once); returns them. Raises DeltaJarsError with what to do."""
    target = jar_dir()
    if (target / DONE).exists():
        return local_jars()
    if shutil.which(mvn) is None:
        raise DeltaJarsError(
            f"mvn not found: install Maven (Debian/Ubuntu: apt-get install maven) to resolve "
            f"{maven_coordinate()}"
        )
    artifact, version = coordinates()
    with tempfile.TemporaryDirectory(prefix="llmfeat-delta-jars-") as tmp:
        Path(tmp, "pom.xml").write_text(POM.format(artifact=artifact, version=version))
        out = Path(tmp, "jars")
        cmd = [mvn, "-B", "-q", "-f", str(Path(tmp, "pom.xml")), f"{DEPENDENCY_PLUGIN}:copy-dependencies",
               f"-DoutputDirectory={out}", "-DincludeScope=runtime"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in (done.stdout + done.stderr).splitlines() if "ERROR" in line]
            first = re.sub(r"\x1b\[[0-9;]*m|\[ERROR\] ?", "", errors[0] if errors else "").strip()
            raise DeltaJarsError(
                f"Maven could not resolve {maven_coordinate()} (the delta-spark jar for the installed "
                f"pyspark and delta-spark): {first or done.returncode}"
            )
        shipped = spark_shipped()
        target.mkdir(parents=True, exist_ok=True)
        for jar in out.glob("*.jar"):
            if _artifact_name(jar.name) not in shipped:
                shutil.copy2(jar, target / jar.name)
    if not any(p.name.startswith(f"{artifact}-{version}") for p in target.glob("*.jar")):
        raise DeltaJarsError(f"Maven ran but {artifact}-{version}.jar is not in {target}")
    (target / DONE).write_text(maven_coordinate() + "\n")
    return local_jars()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmfeat.delta_jars", description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the resolved jars, comma separated")
    args = parser.parse_args(argv)
    if args.list:
        jars = local_jars()
        if not jars:
            print(f"no resolved jars in {jar_dir()}: run `make setup`", file=sys.stderr)
            return 1
        print(",".join(jars))
        return 0
    try:
        jars = resolve()
    except DeltaJarsError as err:
        print(f"delta jars: {err}", file=sys.stderr)
        return 1
    print(f"delta jars: {maven_coordinate()}, {len(jars)} jars in {jar_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
