"""Prints a pip constraints file that pins every runtime dependency of pyproject.toml to its floor,
so that CI can install and test the lowest versions the project says it supports."""

import re
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
for requirement in project["dependencies"]:
    name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9a-z.]*)(,<.*)?", requirement).group(1, 2)
    print(f"{name}=={floor}")
