"""Smoke test of a fresh install (CI runs it on a second Python, e.g. 3.12): `bsf-nnunet info`, one toy training
step through nnUNetv2_train and one nnUNetv2_predict, on a synthetic dataset in a temporary folder."""
import os
import subprocess
import sys
import tempfile
import textwrap

TRAINER = textwrap.dedent('''
    from bsf_nnunet.training import BSFTrainer_Toy


    class BSFTrainer_Smoke(BSFTrainer_Toy):
        bsf_final_validation = False
        bsf_recipe = dict(BSFTrainer_Toy.bsf_recipe, num_epochs=1, num_iterations_per_epoch=1,
                          num_val_iterations_per_epoch=1)
''')


def run(cmd, env):
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        sys.exit(f"smoke test: {' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-5000:]}")
    return p.stdout


def main() -> None:
    from bsf_nnunet.datasets.synthetic import build_synthetic_dataset

    root = tempfile.mkdtemp(prefix="bsf_smoke_")
    env = dict(os.environ, nnUNet_raw=f"{root}/raw", nnUNet_preprocessed=f"{root}/pre", nnUNet_results=f"{root}/res",
               nnUNet_extTrainer=f"{root}/ext", nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", BSF_CPU_ENGINE="torch",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))  # this Python's tools
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        os.makedirs(env[k])
    with open(f"{root}/ext/smoke_trainer.py", "w") as f:
        f.write(TRAINER)
    out = run(["bsf-nnunet", "info"], env)
    assert "trainer discovery: OK" in out and f"Python {sys.version.split()[0]}" in out, out
    build_synthetic_dataset(env["nnUNet_raw"], 990, "Smoke", num_train=5, num_test=1, shape=(64, 64, 64))
    run(["nnUNetv2_plan_and_preprocess", "-d", "990", "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
        dict(env, nnUNet_n_proc_DA="1"))  # the planner sets torch's threads to it
    run(["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", "BSFTrainer_Smoke", "-device", "cpu"], env)
    raw = f"{env['nnUNet_raw']}/Dataset990_Smoke"
    run(["nnUNetv2_predict", "-i", f"{raw}/imagesTs", "-o", f"{root}/pred", "-d", "990", "-c", "3d_fullres", "-f", "0",
         "-tr", "BSFTrainer_Smoke", "-chk", "checkpoint_final.pth", "-device", "cpu", "--disable_tta"], env)
    predicted = [f for f in os.listdir(f"{root}/pred") if f.endswith(".nii.gz")]
    assert predicted, os.listdir(f"{root}/pred")
    print(f"smoke test on Python {sys.version.split()[0]}: info, one training step and one prediction passed "
          f"({predicted[0]})")


if __name__ == "__main__":
    main()
