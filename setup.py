"""Packaging glue: installs ``bsf_nnunet_discovery.pth`` so nnU-Net finds the BSF trainers in any new shell.

The .pth runs ``bsf_nnunet_trainers.register()`` at interpreter start-up, which appends the installed
``trainers/`` folder to ``nnUNet_extTrainer``. It is written by build_py for regular installs and by
editable_wheel for ``pip install -e .`` (setuptools does not install ``data_files`` in editable mode).
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "bsf_nnunet_discovery.pth"
PTH_LINE = ('import os; exec("try:\\n import bsf_nnunet_trainers as _bsf_t; _bsf_t.register()\\n'
            'except Exception:\\n pass")\n')


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            with open(os.path.join(self.build_lib, PTH_NAME), "w") as f:
                f.write(PTH_LINE)


class EditableWheelWithPth(editable_wheel):
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        with open(os.path.join(installation_dir, PTH_NAME), "w") as f:
            f.write(PTH_LINE)


PACKAGES = find_packages(include=["bsf_nnunet", "bsf_nnunet.*"]) + ["bsf_nnunet_trainers", "bsf_nnunet_plans"]

setup(packages=PACKAGES, cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
