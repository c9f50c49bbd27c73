"""nnU-Net finds the BSF trainers right after install, in a new process with a clean environment."""
import multiprocessing as mp
import os
import pickle
import subprocess
import sys

import pytest

LOOKUP = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
          "import sys, os\n"
          "for n in sys.argv[1:]:\n"
          "    c = f(n)\n"
          "    print('FOUND', n, c.__module__, sys.modules[c.__module__].__file__)\n"
          "print('EXT', os.environ.get('nnUNet_extTrainer'))\n")

NAMES = ["BSFTrainer", "BSFTrainer_Tiny", "BSFTrainer_Big", "BSFTrainer_Large", "BSFTrainer_Toy", "BSFTrainer_scratch"]


def clean_env(tmp_path, **extra):
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin", "HOME": str(tmp_path)}
    env.update(extra)
    return env


def lookup(python, env, cwd):
    p = subprocess.run([python, "-c", LOOKUP] + NAMES, env=env, cwd=cwd, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:]
    found = [line.split() for line in p.stdout.splitlines() if line.startswith("FOUND")]
    assert [f[1] for f in found] == NAMES
    assert all(f[2] == ("bsf_nnunet.training.finetune" if f[1] == "BSFTrainer" else
                        "bsf_nnunet.training.variants.finetune") for f in found)
    ext = [line for line in p.stdout.splitlines() if line.startswith("EXT")][0]
    return found, ext


def test_trainers_found_in_clean_environment(tmp_path):
    found, ext = lookup(sys.executable, clean_env(tmp_path), tmp_path)
    assert "trainers" in ext


def test_user_ext_trainer_entries_are_kept(tmp_path):
    mine = tmp_path / "my_trainers"
    mine.mkdir()
    _, ext = lookup(sys.executable, clean_env(tmp_path, nnUNet_extTrainer=str(mine)), tmp_path)
    assert ext.split()[1].split(os.pathsep)[0] == str(mine)


def test_regular_install_registers_its_own_folder(tmp_path):
    """`pip install .` (not editable) into a fresh venv: the .pth there points nnU-Net at the installed shims."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/cli/ -> repo
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    wheels = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(wheels), repo], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-4000:]
    (wheel,) = wheels.glob("bsf_nnunet-*.whl")
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-4000:]
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    assert os.path.isfile(os.path.join(site, "bsf_nnunet_discovery.pth"))
    assert os.path.isfile(os.path.join(site, "bsf_nnunet_plans", "variants.json"))
    env = clean_env(tmp_path)
    env["PATH"] = str(venv / "bin") + os.pathsep + env["PATH"]
    found, ext = lookup(py, env, tmp_path)
    assert os.path.join(site, "bsf_nnunet_trainers") in ext
    assert all(f[3].startswith(site) for f in found)  # the installed copy, not the checkout


def _child(q, payload):
    cls = pickle.loads(payload)
    q.put(f"{cls.__module__}.{cls.__name__}")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_trainer_classes_pickle_to_workers(method):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name("BSFTrainer_Toy")
    ctx = mp.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, pickle.dumps(cls)))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    assert q.get(timeout=5) == "bsf_nnunet.training.variants.finetune.BSFTrainer_Toy"


class _ImportsOnAttributeAccess(type(os)):
    """A module that imports another module whenever an attribute it lacks is read, as a lazily loaded module
    (importlib.util.LazyLoader) runs its imports on the first attribute access."""

    def __getattr__(self, name):
        import importlib

        n = len([k for k in sys.modules if k.startswith("_bsf_lazy_child")])
        sys.modules[f"_bsf_lazy_child{n}"] = type(os)(f"_bsf_lazy_child{n}")
        importlib.invalidate_caches()
        raise AttributeError(name)


def test_info_finds_trainers_as_nnunet_train_does_despite_lazy_modules(capsys, monkeypatch):
    """Issue #27: nnU-Net's lookup iterates sys.modules reading each module's __file__; a lazy module imported
    earlier in the process changes sys.modules during that loop. nnUNetv2_train never has one, so `info` must not
    report the failure that this process would meet."""
    from nnunetv2.utilities.find_class_by_name import temporarily_cleanup_imports_from_path

    from bsf_nnunet.cli import info

    monkeypatch.setitem(sys.modules, "_bsf_lazy_parent", _ImportsOnAttributeAccess("_bsf_lazy_parent"))
    with pytest.raises(RuntimeError, match="dictionary changed size during iteration"):
        with temporarily_cleanup_imports_from_path(os.path.dirname(__file__)):  # the mechanism, confirmed
            pass
    assert info.run(None) == 0
    out = capsys.readouterr().out
    assert "trainer discovery: OK, nnUNetv2_train -tr BSFTrainer finds bsf_nnunet.training.finetune.BSFTrainer" \
        in out, out
    for k in [k for k in sys.modules if k.startswith("_bsf_lazy_child")]:
        del sys.modules[k]


def test_info_reports_a_real_discovery_failure(tmp_path):
    """A trainer folder whose module cannot be imported makes nnUNetv2_train's lookup fail: info says so, with the
    end of nnU-Net's message."""
    from bsf_nnunet.cli import info

    mine = tmp_path / "my_trainers"
    mine.mkdir()
    (mine / "my_trainer.py").write_text("import not_a_module_bsf_xyz\n")
    ok, what = info.check_discovery(dict(os.environ, nnUNet_extTrainer=str(mine)))
    assert not ok and "not_a_module_bsf_xyz" in what, what
