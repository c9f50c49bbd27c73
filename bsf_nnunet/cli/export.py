"""``bsf-nnunet export``: a trained BSF model out of nnU-Net as a MONAI state dict, an ONNX file, a Hub folder or
an nnssl folder."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export a trained BSF model: MONAI state dict, ONNX, a Hugging Face Hub folder, or nnssl",
        description="Reads the results folder that nnUNetv2_predict would use (-d, -tr, -p, -c, -f) and writes "
                    "into OUT: --to monai: model.pt (plain state dict of MONAI's SwinUNETR) and model.safetensors; "
                    "--to onnx: model.onnx at the plans' patch size, checked against PyTorch with onnxruntime; "
                    "--to hub: model.safetensors and a model card README.md, ready for `bsf-nnunet weights push` "
                    "(huggingface_hub upload_folder). Each also writes bsf_model.json (channels, spacing, "
                    "normalisation, patch, labels, MONAI constructor arguments, patch merging, axis order, source). "
                    "--to nnssl (pretraining results too): checkpoint_final.pth with nnssl's adaptation plan inside, "
                    "adaptation_plan.json and config.json, the folder nnssl's fine-tuning reads.")
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name (as for nnUNetv2_predict)")
    p.add_argument("-tr", "--trainer", required=True, help="trainer of the results folder, e.g. BSFTrainer")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-f", "--fold", required=True, help="fold number or 'all'")
    p.add_argument("--to", required=True, choices=["monai", "onnx", "hub", "nnssl"], help="what to write")
    p.add_argument("-o", "--output", required=True, help="output folder (refused if it holds files, see --overwrite)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file in the fold folder (default checkpoint_final.pth)")
    p.add_argument("--license", default="other",
                   help="--to hub: the model card's licence identifier (default 'other', with a note to set it)")
    p.add_argument("--overwrite", action="store_true", help="replace the exported files in an existing OUT")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..weights.export import export_model, load_export_source

    src = load_export_source(args.dataset, args.trainer, args.plans, args.configuration, args.fold,
                             checkpoint=args.checkpoint, pretraining_ok=args.to == "nnssl")
    result = export_model(src, args.to, args.output, overwrite=args.overwrite, license_id=args.license)
    a = src.arch_kwargs
    print(f"Exported {src.checkpoint} (variant {src.variant}, merging {a['merging']}, axis order {a['axis_order']})"
          f" --to {args.to}:")
    for f in result["files"]:
        print(f"  {f}")
    if result["other_files"]:
        print(f"  left as they were in {args.output}: {', '.join(result['other_files'])}"
              + (" (upload_folder uploads them too)" if args.to == "hub" else ""))
    if args.to == "hub":
        print(f"Upload with: bsf-nnunet weights push {args.output} USER/REPO (or huggingface_hub upload_folder)")
    return 0
