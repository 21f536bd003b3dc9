"""Packaging: the wheel and sdist carry every file of the package, and an installed wheel runs.

`python -m build` makes both (the wheel from the sdist, as a downstream packager would), the
wheel goes into a fresh virtual environment, and `rower` is run from there: `--version` from
the package metadata, `sim --help`, and a `rower sim` that answers `/health`.

For the machine's Python the fresh environment borrows the dependencies already installed in
this one, so the test needs no network. Newer CPythons found on the machine get a full install
whose dependency wheels are cached under `$ROWER_CACHE_DIR/wheelhouse/` (downloaded once).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import Process, free_port, running

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "src" / "rower"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
# The CPythons that pyproject.toml's classifiers promise, besides the one running the tests.
NEWER_PYTHONS = ("3.12", "3.13")


@dataclass(frozen=True)
class Distributions:
    wheel: Path
    sdist: Path


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Distributions:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT])
    (wheel,) = out.glob("rower-*.whl")
    (sdist,) = out.glob("rower-*.tar.gz")
    return Distributions(wheel, sdist)


def package_files() -> list[str]:
    """Files under src/rower that a build should carry: tracked, or new and not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "src/rower"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.splitlines()
    files = [name for name in listed if (ROOT / name).is_file()]
    return [str(Path(name).relative_to("src")) for name in files]


def test_the_wheel_and_sdist_carry_every_package_file(dists: Distributions) -> None:
    expected = package_files()
    assert "rower/__init__.py" in expected
    with zipfile.ZipFile(dists.wheel) as wheel:
        in_wheel = set(wheel.namelist())
    with tarfile.open(dists.sdist) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    missing_wheel = [name for name in expected if name not in in_wheel]
    missing_sdist = [name for name in expected if f"src/{name}" not in in_sdist]
    assert not missing_wheel, f"not in the wheel: {missing_wheel}"
    assert not missing_sdist, f"not in the sdist: {missing_sdist}"


def test_non_python_files_are_checked_too(dists: Distributions) -> None:
    assets = [name for name in package_files() if not name.endswith(".py")]
    assert assets, "the web dashboard's static files live under src/rower/"
    with zipfile.ZipFile(dists.wheel) as wheel:
        assert set(assets) <= set(wheel.namelist())


def test_the_metadata_states_the_supported_pythons(dists: Distributions) -> None:
    with zipfile.ZipFile(dists.wheel) as wheel:
        (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        text = wheel.read(metadata).decode()
    assert "Requires-Python: >=3.11" in text
    for version in ("3.11", *NEWER_PYTHONS):
        assert f"Classifier: Programming Language :: Python :: {version}" in text
    assert "Requires-Dist: aiohttp" in text


# --- installed and run -----------------------------------------------------------------------


def venv_bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def run(argv: list[str | Path], **kwargs: object) -> str:
    answer = subprocess.run(
        [str(a) for a in argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        **kwargs,  # type: ignore[call-overload]
    )
    assert answer.returncode == 0, f"{argv} exited {answer.returncode}:\n{answer.stderr}"
    return str(answer.stdout)


def check_installed_rower(venv: Path, wheel: Path) -> None:
    """`rower --version`, `rower sim --help` and a live `rower sim`, all from `venv`."""
    version = wheel.name.split("-")[1]
    assert run([venv_bin(venv, "rower"), "--version"]).strip() == f"rower {version}"
    assert "--slots" in run([venv_bin(venv, "rower"), "sim", "--help"])
    where = run([venv_bin(venv, "python"), "-c", "import rower; print(rower.__file__)"])
    assert Path(where.strip()).is_relative_to(venv), f"rower imported from {where}"
    port = free_port()
    sim = Process([str(venv_bin(venv, "rower")), "sim", "--addr", f"127.0.0.1:{port}"])
    with running(sim):
        sim.wait_http(f"http://127.0.0.1:{port}/health", timeout=30)


@pytest.mark.timeout(90)
def test_the_wheel_installs_and_runs_in_a_fresh_environment(
    dists: Distributions, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    run([*pip(venv), "install", "--quiet", "--no-deps", "--no-index", "--no-compile", dists.wheel])
    # The dependencies: this environment's site-packages as a plain path (its .pth files, among
    # them the editable install of the source tree, are not run from there).
    purelib = run(
        [
            venv_bin(venv, "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ]
    ).strip()
    Path(purelib, "rower-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"])
    run([*pip(venv), "check"])
    check_installed_rower(venv, dists.wheel)


def newer_pythons() -> Iterator[str]:
    """Paths of the newer CPythons on this machine: on PATH or installed by pyenv."""
    for version in NEWER_PYTHONS:
        found = shutil.which(f"python{version}")
        candidates = [found] if found else []
        pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
        candidates += sorted(glob.glob(f"{pyenv}/versions/{version}.*/bin/python{version}"))
        for candidate in candidates:
            works = subprocess.run([candidate, "-c", "pass"], capture_output=True, timeout=30)
            if works.returncode == 0:  # pyenv's shims exist even for versions not selected
                yield candidate
                break


def pip(venv: Path) -> list[str | Path]:
    """This environment's pip, working on `venv` (which then needs no pip of its own)."""
    python = venv_bin(venv, "python")
    return [sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check"]


def wheelhouse(python: str, wheel: Path, venv: Path) -> Path:
    """Dependency wheels for `python`, pinned by constraints.txt; downloaded on first use."""
    cache = Path(os.environ.get("ROWER_CACHE_DIR") or Path.home() / ".cache" / "rower")
    tag = run([python, "-c", "import sys; print(sys.implementation.cache_tag)"]).strip()
    pins = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()[:12]
    house = cache / "wheelhouse" / f"{tag}-{pins}"
    if not (house / ".complete").exists():
        download = ["download", "--quiet", "--only-binary=:all:", "-c", CONSTRAINTS]
        run([*pip(venv), *download, "-d", house, wheel])
        for own in house.glob("rower-*"):
            own.unlink()
        (house / ".complete").touch()
    return house


@pytest.mark.timeout(300)
@pytest.mark.parametrize("version", NEWER_PYTHONS)
def test_the_wheel_runs_on_newer_pythons(
    dists: Distributions, tmp_path: Path, version: str
) -> None:
    python = next((p for p in newer_pythons() if p.endswith(version)), None)
    if python is None:
        pytest.skip(f"no CPython {version} on this machine (PATH or pyenv)")
    venv = tmp_path / "venv"
    run([python, "-m", "venv", "--without-pip", venv])
    house = wheelhouse(python, dists.wheel, venv)
    offline = ["--quiet", "--no-compile", "--no-index", "--find-links", house]
    run([*pip(venv), "install", *offline, dists.wheel])
    check_installed_rower(venv, dists.wheel)
