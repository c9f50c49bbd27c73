"""``bsf-nnunet weights``: the published BrainSegFounder weights (list), downloads (pull), what a checkpoint file
records and its sidecar (describe), uploads (push)."""
from __future__ import annotations

import json
import sys

SPEC_HELP = "bsf:NAME (bsf-nnunet weights list) or hf://OWNER/REPO/FILE[@REVISION]"


def register(sub) -> None:
    p = sub.add_parser("weights", help="published weights: list, pull (download), describe a file, push (upload)",
                       description="The published BrainSegFounder files by short name (bsf:NAME), downloads of any "
                                   "Hugging Face file (hf://OWNER/REPO/FILE) into huggingface_hub's cache, and "
                                   "uploads of exported folders. bsf: and hf:// names also work directly with "
                                   "nnUNetv2_train -pretrained_weights, import-model and lowdata run "
                                   "(docs/weights.md).")
    p.set_defaults(func=_no_action, _parser=p)
    sp = p.add_subparsers(dest="step", metavar="ACTION")

    q = sp.add_parser("list", help="the published files, their channels and use",
                      description="The table of published files (plans/published_weights.json).")
    q.add_argument("--json", action="store_true", help="print the table as JSON")
    q.set_defaults(func=_list)

    q = sp.add_parser("pull", help="download a checkpoint into the Hugging Face cache; prints its path",
                      description="Downloads with huggingface_hub (resumes; HF_HUB_OFFLINE=1 uses the cache only; "
                                  "HF_TOKEN or `hf auth login` for gated repositories), checks that the file is a "
                                  "checkpoint and prints its local path as the last line of stdout (licence, "
                                  "citation and notes go to stderr).")
    q.add_argument("spec", metavar="NAME", help=SPEC_HELP)
    q.add_argument("--revision", default=None, help="branch, tag or commit (default: the repository's main branch)")
    q.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="accept a checkpoint that needs full unpickling (only for files you trust)")
    q.set_defaults(func=_pull)

    q = sp.add_parser("describe", help="show what a checkpoint file records; record what it does not (sidecar)",
                      description="Prints the format, input channels, patch merging and axis order that the loader "
                                  "reads from FILE. With --channels / --merging / --axis-order it first writes them "
                                  "to FILE.bsf.json beside it (the sidecar), which every command that reads FILE "
                                  "then uses: name the channels of an official BrainSegFounder or MONAI file once "
                                  "(docs/weights.md).")
    q.add_argument("file")
    q.add_argument("--channels", default=None, metavar="NAMES",
                   help="the input channels the file was trained on, in order, e.g. FLAIR,T1ce,T1,T2")
    q.add_argument("--merging", choices=("legacy", "fixed"), default=None,
                   help="its patch merging (MONAI < 1.3 files: legacy)")
    q.add_argument("--axis-order", choices=("xyz", "zyx"), default=None,
                   help="the array order it was trained on (MONAI: xyz; nnU-Net: zyx)")
    q.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="accept a checkpoint that needs full unpickling (only for files you trust)")
    q.set_defaults(func=_describe)

    q = sp.add_parser("push", help="upload an exported folder to a Hugging Face model repository",
                      description="Uploads FOLDER (README.md model card, weights such as *.safetensors, JSON "
                                  "metadata: what `bsf-nnunet export --to hub` writes) with HfApi.upload_folder. The "
                                  "repository is created if missing. Needs a token with write access (`hf auth "
                                  "login` or HF_TOKEN).")
    q.add_argument("folder")
    q.add_argument("repo", help="OWNER/NAME of the model repository")
    q.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    q.add_argument("--private", action="store_true", help="create the repository private (if it does not exist)")
    q.add_argument("--dry-run", action="store_true", help="list the files and sizes that would be uploaded; no upload")
    q.set_defaults(func=_push)


def _no_action(args) -> int:
    args._parser.print_help(sys.stderr)
    return 2


def _list(args) -> int:
    from ..weights.hub import TABLE_FILE, published_weights, repo_notice

    table = published_weights()
    repos = {e.repo: repo_notice(e.repo) for e in table.values()}
    if args.json:
        print(json.dumps({"repos": repos, "weights": {n: e.as_dict() for n, e in table.items()}}, indent=2))
        return 0
    width = max(len(e.spec) for e in table.values())
    for repo, info in repos.items():
        print(f"{info['page']} ({repo}), licence: {info['licence']}")
        print(f"  cite: {info['citation']}")
        for e in (e for e in table.values() if e.repo == repo):
            outputs = f"; outputs {', '.join(e.outputs)}" if e.outputs else ""
            print(f"  {e.spec:{width}s}  {e.filename}: {e.description}; variant {e.variant}; channels "
                  f"{', '.join(e.channels)}{outputs}\n  {'':{width}s}  use: {e.use}")
    print(f"Download: bsf-nnunet weights pull NAME; or give the NAME straight to nnUNetv2_train -pretrained_weights "
          f"or bsf-nnunet import-model (the table: plans/{TABLE_FILE}).")
    return 0


def _pull(args) -> int:
    from ..settings import value
    from ..weights.hub import resolve_checkpoint
    from ..weights.loader import UNSAFE_PICKLE_ENV

    unsafe = args.allow_unsafe_pickle or value(UNSAFE_PICKLE_ENV)
    resolved = resolve_checkpoint(args.spec, revision=args.revision, allow_unsafe_pickle=unsafe)
    if resolved.entry is not None:
        print(f"{resolved.entry.spec}: channels {', '.join(resolved.entry.channels)}; use: {resolved.entry.use}",
              file=sys.stderr)
    print(resolved.path)
    return 0


def _describe(args) -> int:
    from ..weights.channels import ChannelMappingError, parse_channel_list
    from ..weights.loader import load_checkpoint
    from ..weights.sidecar import write_sidecar

    ckpt = load_checkpoint(args.file, allow_unsafe_pickle=args.allow_unsafe_pickle)
    if args.channels or args.merging or args.axis_order:
        names = parse_channel_list(args.channels) if args.channels else None
        n_in = ckpt.metadata.get("in_channels")
        if names is not None and n_in is not None and len(names) != n_in:
            raise ChannelMappingError(f"{args.file} has {n_in} input channels but --channels names {len(names)} "
                                      f"({', '.join(names)}): name each channel once, in the order it was trained.")
        print(f"wrote {write_sidecar(args.file, names, args.merging, args.axis_order)}", file=sys.stderr)
        ckpt = load_checkpoint(args.file, allow_unsafe_pickle=args.allow_unsafe_pickle)
    meta = ckpt.metadata
    channels = meta.get("channel_names")
    for label, value in (("format", meta.get("format")), ("input channels", meta.get("in_channels")),
                         ("channel names", ", ".join(map(str, channels)) if channels else "not recorded"),
                         ("merging", _assumed(meta, "merging")), ("axis order", _assumed(meta, "axis_order")),
                         ("variant", meta.get("variant") or meta.get("variant_guess")),
                         ("sidecar", meta.get("sidecar", "none"))):
        print(f"{label + ':':16} {value}")
    return 0


def _assumed(meta: dict, key: str) -> str:
    value = meta.get(key)
    return f"{value} (assumed)" if meta.get(f"{key}_assumed") else str(value)


def _push(args) -> int:
    from ..weights.hub import push_folder, upload_plan

    if args.dry_run:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(args.repo)
        plan = upload_plan(args.folder)
        for name, size in plan:
            print(f"{size:>14,d}  {name}")
        print(f"Would upload {len(plan)} files ({sum(s for _, s in plan):,d} bytes) to {args.repo}"
              f"{'@' + args.revision if args.revision else ''}; nothing was uploaded (--dry-run).")
        return 0
    print(f"Uploaded: {push_folder(args.folder, args.repo, revision=args.revision, private=args.private)}")
    return 0
