"""One error base (bsf_nnunet.errors.BSFError) and one place where bsf-nnunet turns errors into messages."""
import errno
import importlib
import inspect
import pickle
import pkgutil

import pytest

import bsf_nnunet
from bsf_nnunet.errors import BSFError
from bsf_nnunet.lowdata.runner import TrainingFailed

# control flow for one bad case, caught where raised (see bsf_nnunet/errors.py)
# control flow, never shown to a user: StopRequested (a BaseException) always ends as SystemExit(0) with a log line
INTERNAL = {"bsf_nnunet.evaluation.common.CaseError", "bsf_nnunet.datasets.convert.CaseProblem",
            "bsf_nnunet.training.preemption.StopRequested"}


def _package_exceptions():
    for info in pkgutil.walk_packages(bsf_nnunet.__path__, "bsf_nnunet."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                yield f"{cls.__module__}.{cls.__qualname__}", cls


def test_every_package_exception_is_a_bsf_error():
    found = dict(_package_exceptions())
    assert INTERNAL <= set(found), "an internal exception was renamed: update bsf_nnunet/errors.py and INTERNAL"
    assert len(found) > 20
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, BSFError) and name not in INTERNAL)
    assert not outside, f"derive these from bsf_nnunet.errors.BSFError: {outside}"


def test_built_in_bases_message_hint_and_pickling():
    from bsf_nnunet.datasets.convert import ConversionError
    from bsf_nnunet.io import disk_full_error
    from bsf_nnunet.weights.loader import CorruptCheckpointError

    e = disk_full_error(errno.ENOSPC, "/data/x/model.pth")
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename == "/data/x/model.pth"
    assert str(e) == e.message and e.message.startswith("The disk is full") and "/data/x" in e.message
    e = CorruptCheckpointError("ckpt.pth is truncated", detail="EOF")
    assert isinstance(e, RuntimeError) and str(e) == "ckpt.pth is truncated" and e.hint is None
    e = pickle.loads(pickle.dumps(e))  # errors cross process pools
    assert (str(e), e.detail) == ("ckpt.pth is truncated", "EOF")
    e = pickle.loads(pickle.dumps(ConversionError("case_1 has no label", hint="add it")))
    assert isinstance(e, ValueError) and str(e) == "case_1 has no label\n  what to do: add it"


def _raising(error):
    def run(args):
        raise error
    return run


@pytest.mark.parametrize("error, code, expected", [
    (BSFError("no   such\n  file x.nii.gz", hint="convert it first"), 2,
     "bsf-nnunet weights list: error: no such file x.nii.gz\n  what to do: convert it first\n"),
    (NotADirectoryError("x is not a folder"), 2, "bsf-nnunet weights list: error: x is not a folder\n"),
    (TrainingFailed("fold 5 failed"), 1, "bsf-nnunet weights list: error: fold 5 failed\n"),
], ids=["hint", "built-in", "exit-code"])
def test_main_reports_errors_in_one_place(monkeypatch, capsys, error, code, expected):
    from bsf_nnunet.cli import main, weights

    monkeypatch.setattr(weights, "_list", _raising(error))
    assert main.main(["weights", "list"]) == code
    assert capsys.readouterr().err == expected


def test_main_lets_programming_errors_through(monkeypatch):
    from bsf_nnunet.cli import main, plan

    monkeypatch.setattr(plan, "run", _raising(KeyError("bug")))
    with pytest.raises(KeyError):
        main.main(["plan", "-d", "1"])
