"""deepcuts: install with `pip install -e .[test]` (the Makefile does it in .venv)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements(name: str) -> list[str]:
    lines = (HERE / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


setup(
    name="deepcuts",
    version="0.1.0",
    description="Content-based music recommendation at catalogue scale on Spark",
    python_requires=">=3.11,<3.12",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    install_requires=requirements("requirements.txt"),
    extras_require={"test": requirements("requirements-test.txt")},
)
