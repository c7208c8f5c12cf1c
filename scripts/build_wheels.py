#!/usr/bin/env python
"""Build the Kaggle wheel dataset: the ``kaggle_utils`` wheel plus every wheel Kaggle's image lacks,
for the image's Python and platform, then prove that each wheel installs on that target.

Usage (from the repository root; ``make wheels`` runs the first line):

    python scripts/build_wheels.py                          # Kaggle's image: CPython 3.12, manylinux x86_64
    python scripts/build_wheels.py --python-version 3.11    # an older image pinned by a notebook
    python scripts/build_wheels.py --check-only DIR         # only check an existing set

Upload:
    kaggle datasets create  -p datasets/kaggle-utils-wheels      # first time
    kaggle datasets version -p datasets/kaggle-utils-wheels -m "kaggle_utils $(git describe --always)"

Install on Kaggle (offline; keeps the image's torch, timm and numpy):
    pip install --no-index --no-deps /kaggle/input/kaggle-utils-wheels/*.whl

The set (pins chosen for numpy 2.0 and Python 3.12; ``--no-deps`` because smp-3d pins timm==0.9.7 and
dynamic-network-architectures pins timm<1.0.23, both of which fight the image's timm):
    pure:   kaggle_utils, segmentation-models-pytorch-3d, timm-3d, pretrainedmodels, efficientnet-pytorch
            (the last two are source archives on PyPI: built into py3-none-any wheels here), munch,
            dynamic-network-architectures, six
    binary: connected-components-3d, edt, imagecodecs (downloaded for the target with ``pip download
            --only-binary=:all: --python-version X.Y --implementation cp --abi cpXY --platform ...``)

Everything else the package and these wheels import (torch, torchvision, numpy, scipy, scikit-image,
tifffile, numba, PyYAML, tqdm, matplotlib, pillow, huggingface-hub, safetensors, timm, einops) is
in the image (``/work/shared/KAGGLE_IMAGE.md``, the Colab base it is built on).

The check that fails the build: every wheel must install on the target, tested with
``pip install --dry-run --ignore-installed --no-index --no-deps --only-binary=:all: --python-version ...
--implementation cp --abi ... --platform ... --target TMP <every wheel>``; no two wheels of one project;
no wheel requiring a numpy that excludes the image's (:data:`IMAGE_NUMPY`).
"""

from __future__ import annotations

import argparse
import email.parser
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]

#: Pure-Python projects, pinned (installed with --no-deps beside the image's torch/timm).
PURE = {
    "segmentation-models-pytorch-3d": "1.0.2",
    "timm-3d": "1.0.1",
    "pretrainedmodels": "0.7.4",
    "efficientnet-pytorch": "0.7.1",
    "munch": "4.0.0",
    "dynamic-network-architectures": "0.4.4",
    # pretrainedmodels (imported by smp-3d) imports six; not on the image's list, tiny, same version as Colab's.
    "six": "1.17.0",
}
#: Compiled projects: wheels for the target are downloaded, never built. These versions have CPython
#: 3.11 and 3.12 manylinux x86_64 wheels and run with numpy 2.0 (imagecodecs >= 2026.10 needs numpy >= 2.1).
BINARY = {
    "connected-components-3d": "4.1.1",
    "edt": "3.1.2",
    "imagecodecs": "2026.1.14",
}
#: numpy of Kaggle's image (2.0.x): a wheel whose numpy requirement excludes it fails the check.
IMAGE_NUMPY = "2.0.2"
#: glibc of Kaggle's image (Ubuntu 22.04, the Colab base): manylinux tags up to this one install there.
IMAGE_GLIBC = (2, 35)
DEFAULT_PYTHON_VERSION = "3.12"
DEFAULT_OUT = REPO / "datasets" / "kaggle-utils-wheels"
#: The line users (and the notebooks) run on Kaggle.
INSTALL_LINE = "pip install --no-index --no-deps /kaggle/input/kaggle-utils-wheels/*.whl"


class BuildError(RuntimeError):
    """A step of the build failed or the set does not install on the target (message says which)."""


def default_platforms(glibc: tuple[int, int] = IMAGE_GLIBC) -> list[str]:
    """manylinux x86_64 tags that install on a glibc ``glibc`` system, newest first
    (``manylinux_2_35_x86_64`` ... ``manylinux_2_17_x86_64``, plus the ``manylinux2014`` alias)."""
    return [f"manylinux_{glibc[0]}_{minor}_x86_64" for minor in range(glibc[1], 16, -1)] + ["manylinux2014_x86_64"]


@dataclass(frozen=True)
class Target:
    """The interpreter a wheel set is built for: CPython ``python_version`` (``"3.12"``) on ``platforms``."""

    python_version: str = DEFAULT_PYTHON_VERSION
    platforms: tuple[str, ...] = field(default_factory=lambda: tuple(default_platforms()))

    def __post_init__(self) -> None:
        parts = self.python_version.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise BuildError(f"--python-version: expected MAJOR.MINOR such as 3.12, got {self.python_version!r}")
        if not self.platforms:
            raise BuildError("--platform: at least one platform tag is needed")

    @property
    def abi(self) -> str:
        """CPython ABI tag, e.g. ``cp312``."""
        return "cp" + self.python_version.replace(".", "")

    def supported_tags(self) -> set[str]:
        """Every wheel tag (``interpreter-abi-platform``) CPython of this version accepts on these platforms."""
        version = tuple(int(p) for p in self.python_version.split("."))
        tags = [*cpython_tags(version, abis=[self.abi], platforms=self.platforms),
                *compatible_tags(version, interpreter=self.abi, platforms=self.platforms)]
        return {str(t) for t in tags}

    def pip_flags(self) -> list[str]:
        """pip's target options (``--python-version 3.12 --implementation cp --abi cp312 --platform ...``)."""
        flags = ["--python-version", self.python_version, "--implementation", "cp", "--abi", self.abi]
        for plat in self.platforms:
            flags += ["--platform", plat]
        return flags


@dataclass(frozen=True)
class WheelInfo:
    """One wheel of a set: project ``name``, ``version``, compressed ``tag`` (``cp312-cp312-manylinux...``)
    and ``size`` in bytes."""

    path: Path
    name: str
    version: str
    tag: str
    size: int


def describe(folder: Path) -> list[WheelInfo]:
    """The wheels in ``folder`` (sorted by name); raises :class:`BuildError` on a malformed file name."""
    infos = []
    for path in sorted(Path(folder).glob("*.whl")):
        try:
            name, version, _build, _tags = parse_wheel_filename(path.name)
        except InvalidWheelFilename as exc:
            raise BuildError(f"{path}: not a valid wheel file name ({exc})") from None
        tag = "-".join(path.name[:-4].split("-")[-3:])
        infos.append(WheelInfo(path, str(name), str(version), tag, path.stat().st_size))
    return infos


def format_table(infos: list[WheelInfo]) -> str:
    """A plain-text table ``name version tag size`` with a total line."""
    rows = [(i.name, i.version, i.tag, f"{i.size / 2**20:.2f} MiB") for i in infos]
    rows.append(("total", f"{len(infos)} wheels", "", f"{sum(i.size for i in infos) / 2**20:.2f} MiB"))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join("  ".join(r[c].ljust(widths[c]) for c in range(4)).rstrip() for r in rows)


def _metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if not names:
            raise BuildError(f"{path}: no *.dist-info/METADATA inside (not a wheel)")
        return email.parser.Parser().parsestr(zf.read(names[0]).decode("utf-8", "replace"))


def _numpy_problems(info: WheelInfo, target: Target) -> list[str]:
    env = default_environment()
    env.update(python_version=target.python_version, python_full_version=target.python_version + ".0",
               implementation_name="cpython", platform_python_implementation="CPython",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64", extra="")
    problems = []
    for line in _metadata(info.path).get_all("Requires-Dist") or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != "numpy" or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        if not req.specifier.contains(Version(IMAGE_NUMPY), prereleases=True):
            problems.append(f"{info.path.name}: requires {line.strip()}, Kaggle's image has numpy {IMAGE_NUMPY}")
    return problems


def _clean_pip_env() -> dict[str, str]:
    """The environment for pip runs that must not see this machine's pip configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def check_wheel_set(folder: Path, target: Target, python: str = sys.executable) -> list[str]:
    """Problems that would make ``pip install --no-index --no-deps FOLDER/*.whl`` fail on ``target``
    (empty list: the set installs). Checks: valid names, one wheel per project, numpy pins that accept
    :data:`IMAGE_NUMPY`, and pip's own verdict from a ``--dry-run`` install for the target's tags and
    Requires-Python.

    Args:
        folder: the wheel folder.
        target: Python version and platform tags of the machine that will install the set.
        python: interpreter whose pip runs the dry run (needs pip >= 22.2).
    """
    folder = Path(folder)
    try:
        infos = describe(folder)
    except BuildError as exc:
        return [str(exc)]
    if not infos:
        return [f"{folder}: no *.whl files"]
    problems: list[str] = []
    seen: dict[str, str] = {}
    for info in infos:
        prev = seen.setdefault(info.name, info.path.name)
        if prev != info.path.name:
            problems.append(f"{folder}: two wheels of {info.name}: {prev} and {info.path.name}")
    supported = target.supported_tags()
    for info in infos:
        if not {str(t) for t in parse_wheel_filename(info.path.name)[3]} & supported:
            problems.append(f"{info.path.name}: tag {info.tag} does not install on CPython {target.python_version} "
                            f"({target.abi}, {target.platforms[0]} ...)")
        try:
            problems += _numpy_problems(info, target)
        except (BuildError, zipfile.BadZipFile) as exc:
            problems.append(f"{info.path}: {exc}")
    with tempfile.TemporaryDirectory(prefix="wheelcheck-") as tmp:
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index", "--no-deps",
               "--only-binary=:all:", *target.pip_flags(), "--target", tmp, *[str(i.path) for i in infos]]
        res = subprocess.run(cmd, capture_output=True, text=True, env=_clean_pip_env())
    if res.returncode != 0:
        errors = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.startswith("ERROR")]
        problems.append(f"pip cannot install the set on CPython {target.python_version} "
                        f"{target.platforms[0]}: " + (" | ".join(errors) or res.stderr.strip()[-500:]))
    return problems


def _pip(python: str, args: list[str], what: str) -> None:
    res = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join(ln for ln in (res.stderr or res.stdout).splitlines() if "is ignored" not in ln)[-1500:]
        raise BuildError(f"{what} failed (pip {' '.join(args[:2])} ...):\n{tail}")


def check_wheel_matches_source(wheel: Path, source: Path) -> None:
    """:class:`BuildError` unless the ``kaggle_utils/*.py`` files in ``wheel`` are exactly those of the
    ``source`` package folder (plus the ``_version.py`` that ``setup.py`` writes): no stale module."""
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("kaggle_utils/") and n.endswith(".py")}
    tree = {f"kaggle_utils/{p.relative_to(source).as_posix()}" for p in source.rglob("*.py")}
    tree.add("kaggle_utils/_version.py")
    extra, missing = sorted(shipped - tree), sorted(tree - shipped - {"kaggle_utils/_version.py"})
    if extra or missing:
        raise BuildError(f"{wheel.name}: does not match the source tree: "
                         + "; ".join(x for x in (f"extra {', '.join(extra)}" if extra else "",
                                                 f"missing {', '.join(missing)}" if missing else "") if x)
                         + " (a stale ./build folder? remove it and build again)")


def collect(stage: Path, target: Target, python: str = sys.executable) -> None:
    """Put every wheel of the set into the empty folder ``stage`` (needs PyPI, or a mirror pip is set up for)."""
    # kaggle_utils itself: pure, built from this checkout (setuptools/wheel from the calling environment).
    # setuptools copies into ./build/lib and never deletes there: a module removed from the source would
    # ride along from an earlier build, so that folder goes first and the wheel is checked against the tree.
    shutil.rmtree(REPO / "build", ignore_errors=True)
    _pip(python, ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(stage), str(REPO)],
         "building the kaggle_utils wheel")
    for wheel in stage.glob("kaggle_utils-*.whl"):
        check_wheel_matches_source(wheel, REPO / "kaggle_utils")
    # Pure projects: their py3-none-any wheel, or built from the sdist into one (pretrainedmodels,
    # efficientnet-pytorch). --no-deps: their pins are not what Kaggle's image has.
    _pip(python, ["wheel", "-q", "--no-deps", "-w", str(stage), *[f"{k}=={v}" for k, v in PURE.items()]],
         "collecting the pure-Python wheels")
    # Compiled projects: the target's wheels (never the local interpreter's).
    _pip(python, ["download", "-q", "--no-deps", "--only-binary=:all:", *target.pip_flags(), "-d", str(stage),
                  *[f"{k}=={v}" for k, v in BINARY.items()]],
         f"downloading binary wheels for CPython {target.python_version}")
    leftovers = [p.name for p in stage.iterdir() if not p.name.endswith(".whl")]
    if leftovers:
        raise BuildError(f"{stage}: not wheels: {', '.join(leftovers)}")


def build(out: Path, target: Target, python: str = sys.executable) -> list[WheelInfo]:
    """Build the set into a staging folder beside ``out``, check it, then replace the ``*.whl`` of ``out``
    (other files there, ``README.md`` and ``dataset-metadata.json``, stay). A failing check leaves ``out``
    untouched and raises :class:`BuildError` listing every problem."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        collect(stage, target, python)
        problems = check_wheel_set(stage, target, python)
        if problems:
            raise BuildError("the wheel set does not install on the target:\n  " + "\n  ".join(problems))
        for old in [*out.glob("*.whl"), *out.glob("*.tar.gz")]:
            old.unlink()
        for new in stage.glob("*.whl"):
            os.replace(new, out / new.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return describe(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python-version", default=DEFAULT_PYTHON_VERSION,
                   help=f"CPython MAJOR.MINOR of the image (default {DEFAULT_PYTHON_VERSION}, Kaggle's current one)")
    p.add_argument("--platform", action="append", default=None,
                   help="platform tag, repeatable (default: manylinux_2_35..2_17 x86_64 and manylinux2014_x86_64)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="wheel folder (default datasets/kaggle-utils-wheels)")
    p.add_argument("--check-only", action="store_true", help="do not build: only check the set already in --out")
    args = p.parse_args(argv)
    try:
        target = Target(args.python_version, tuple(args.platform or default_platforms()))
        if args.check_only:
            problems = check_wheel_set(args.out, target)
            if problems:
                raise BuildError("the wheel set does not install on the target:\n  " + "\n  ".join(problems))
            infos = describe(args.out)
        else:
            infos = build(args.out, target)
    except BuildError as exc:
        print(f"build_wheels: {exc}", file=sys.stderr)
        return 1
    print(f"wheel set for CPython {target.python_version} ({target.abi}, {target.platforms[0]} ...) in {args.out}:")
    print(format_table(infos))
    print(f"install on Kaggle: {INSTALL_LINE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
