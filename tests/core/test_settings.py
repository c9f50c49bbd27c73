"""Issue #29: one table of every BSF_* environment variable (bsf_nnunet/settings.py), read in one way."""
import os
import re

import pytest

import bsf_nnunet
from bsf_nnunet import settings
from bsf_nnunet.errors import ConfigurationError


def test_every_variable_the_package_reads_is_in_the_table():
    root = os.path.dirname(bsf_nnunet.__file__)
    used = set()
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    used |= set(re.findall(r"\"(BSF_[A-Z0-9_]+)\"", f.read()))
    used -= {"BSF_FOUND"}  # info's marker line, not a variable
    assert used <= {s.name for s in settings.SETTINGS}, used - {s.name for s in settings.SETTINGS}


@pytest.mark.parametrize("name,raw,expected", [
    ("BSF_CPU_MALLOC", "off", False), ("BSF_CPU_MALLOC", "", True), ("BSF_MEMORY_GB", "20", 20.0),
    ("BSF_STOP_AFTER_EPOCH", "3", 3), ("BSF_CPU_ENGINE", "ORT", "onnxruntime"), ("BSF_CPU_ENGINE", "", "auto"),
    ("BSF_SKIP_RAW_CHECK", "yes", True), ("BSF_DIST_TIMEOUT", "60", 60.0)])
def test_values_parse_one_way(monkeypatch, name, raw, expected):
    monkeypatch.setenv(name, raw)
    assert settings.value(name) == expected


@pytest.mark.parametrize("name,raw", [("BSF_CPU_MALLOC", "maybe"), ("BSF_MEMORY_GB", "lots"),
                                      ("BSF_STOP_AFTER_EPOCH", "-1"), ("BSF_CPU_ENGINE", "tensorrt"),
                                      ("BSF_DIST_TIMEOUT", "0")])
def test_bad_values_name_the_variable_and_what_it_takes(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigurationError, match=re.escape(f"{name}={raw!r}: use ")):
        settings.value(name)


def test_info_table_lists_them_all(monkeypatch):
    monkeypatch.setenv("BSF_MEMORY_GB", "12")
    text = settings.table()
    assert all(s.name in text for s in settings.SETTINGS)
    assert re.search(r"BSF_MEMORY_GB\s+12\s+\(default None\)", text)
