"""nnU-Net's folders are read in one way (bsf_nnunet.paths.nnunet_folder), at call time, with one message."""
import pytest

from bsf_nnunet.errors import BSFError, ConfigurationError
from bsf_nnunet.paths import NNUNET_FOLDERS, nnunet_folder


def test_set_unset_and_optional(monkeypatch, tmp_path):
    for name in NNUNET_FOLDERS:
        monkeypatch.setenv(name, str(tmp_path / name))
        assert nnunet_folder(name) == str(tmp_path / name)  # read now, not when nnU-Net was imported
        monkeypatch.delenv(name)
        assert nnunet_folder(name, required=False) is None
        with pytest.raises(ConfigurationError, match=f"{name} is not set: export it .* export {name}=") as e:
            nnunet_folder(name)
        assert isinstance(e.value, (BSFError, ValueError)) and "or pass" not in str(e.value)
    with pytest.raises(ConfigurationError, match="nnUNet_results is not set.*, or pass --results FOLDER"):
        nnunet_folder("nnUNet_results", instead="pass --results FOLDER")


def test_only_nnunet_folders(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", "/x")
    with pytest.raises(ValueError, match="not one of nnU-Net's folders"):
        nnunet_folder("nnUNet_extTrainer")


def test_package_reads_nnunet_folders_only_here():
    """No other module reads nnUNet_raw / _preprocessed / _results from os.environ or nnunetv2.paths itself."""
    import pathlib
    import re

    import bsf_nnunet

    root = pathlib.Path(bsf_nnunet.__file__).parent
    direct = re.compile(r"environ(\.get)?[\[(]\s*['\"]nnUNet_(raw|preprocessed|results)|nnunetv2\.paths import")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "paths.py" and direct.search(p.read_text())]
    assert offenders == []
