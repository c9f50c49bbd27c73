"""``bsf-nnunet import-model``: run a published fine-tuned BrainSegFounder / MONAI Swin-UNETR in nnUNetv2_predict."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("import-model", help="turn a fine-tuned MONAI Swin-UNETR checkpoint into an nnU-Net model",
                       description="Writes $nnUNet_results/DatasetID_.../BSFTrainer_imported__BSFImportedPlans__"
                                   "3d_fullres/fold_all so that `nnUNetv2_predict -d ID -c 3d_fullres -tr "
                                   "BSFTrainer_imported -p BSFImportedPlans -f all -step_size 0.4` segments new "
                                   "cases with it (the original's sliding-window overlap 0.6, no mirroring).")
    p.add_argument("checkpoint", help="a file, or bsf:NAME (bsf-nnunet weights list) / hf://OWNER/REPO/FILE "
                                      "(downloaded; a published file needs no --channels, --regions, --merging, "
                                      "--axis-order)")
    p.add_argument("-d", "--dataset", type=int, required=True, help="dataset ID to file the model under")
    p.add_argument("--channels", default=None,
                   help="input channels in the checkpoint's order, e.g. FLAIR,T1ce,T1,T2 (published files: from the "
                        "table)")
    p.add_argument("--regions", default=None, choices=["brats"], help="brats: sigmoid outputs TC, WT, ET")
    p.add_argument("--labels", default=None, help="softmax models: class names in output order (background first)")
    p.add_argument("--dataset-name", default=None, help="folder name (default DatasetID_Imported)")
    p.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128], help="sliding-window size (default 128^3)")
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0],
                   help="spacing (mm, z y x) the model expects; inputs are resampled to it (default 1 1 1)")
    p.add_argument("--merging", default=None, choices=["legacy", "fixed"],
                   help="patch merging the weights were trained with (default legacy = MONAI < 1.5, the published "
                        "ones)")
    p.add_argument("--axis-order", default=None, choices=["xyz", "zyx"],
                   help="array order the weights saw (default xyz, as in MONAI pipelines)")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="allow checkpoints that need full unpickling (only for files you trust)")
    p.add_argument("--tta", action="store_true",
                   help="allow nnU-Net's mirroring test-time augmentation (8x the windows); default: off, as in the "
                        "original BrainSegFounder inference")
    p.add_argument("--blending", default="constant", choices=["constant", "gaussian"],
                   help="weights of overlapping windows in nnUNetv2_predict: constant, as the original (default), or "
                        "nnU-Net's Gaussian")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..weights.import_model import ORIGINAL_BLENDING, ORIGINAL_OVERLAP, import_model, predict_command

    out = import_model(args.checkpoint, args.dataset, args.channels.split(",") if args.channels else None,
                       regions=args.regions, labels=args.labels.split(",") if args.labels else None,
                       dataset_name=args.dataset_name,
                       patch=args.patch, spacing=args.spacing, merging=args.merging, axis_order=args.axis_order,
                       allow_unsafe_pickle=args.allow_unsafe_pickle, overwrite=args.overwrite, tta=args.tta,
                       blending=args.blending)
    tta = ("mirroring test-time augmentation on (--tta: 8x the windows; the original has none)" if args.tta else
           "no mirroring (as the original; --tta allows nnU-Net's)")
    blending = (f"windows blended with {ORIGINAL_BLENDING} weights, as the original (the model's plans say so; "
                "--blending gaussian for nnU-Net's)" if args.blending == ORIGINAL_BLENDING else
                f"nnU-Net's Gaussian blending of windows (the original: {ORIGINAL_BLENDING} weights)")
    print(f"Wrote {out}\nPredict with:\n  {predict_command(args.dataset)}\n"
          f"-step_size matches the original's sliding-window overlap {ORIGINAL_OVERLAP} (nnUNetv2_predict takes it "
          f"from the command line, default 0.5); {tta}; {blending}. Still different from MONAI's "
          f"sliding_window_inference: where the windows lie (docs/fidelity.md, published-model inference).")
    return 0
