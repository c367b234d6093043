"""`hf-hybrid push DIR REPO`: the CLI of push_to_hub / push_adapter (imported by hf_hybrid_attn.cli)."""

from __future__ import annotations

import json
import os


def add_push_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "push", help="push a converted model or a PEFT adapter folder to the Hub, with its model card",
        description="Push DIR (a converted model saved with save_pretrained / `hf-hybrid convert`, or a PEFT "
                    "adapter folder) to the Hub repo REPO, with a generated model card. Needs HF_TOKEN or "
                    "`hf auth login`.")
    p.add_argument("dir", help="model folder (config.json with 'hybrid') or adapter folder (adapter_config.json)")
    p.add_argument("repo", help="Hub repo id, namespace/name")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    p.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    p.add_argument("--card-from", default=None, metavar="DIR",
                   help="folder with diagnostics.json (or demo.json) and an LA-share *share*.png for the card")
    p.add_argument("--base-model", default=None, help="Hub id of the base model (card metadata; adapters: the hybrid base)")
    p.add_argument("--license", default=None, help="license id for the card (default: inherited from the base)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--remote-code", action="store_true",
                   help="also upload the modeling code, so the repo loads with trust_remote_code=True without the package")
    p.set_defaults(func=run_push)


def run_push(args) -> int:
    from .push import push_adapter, push_to_hub

    folder = args.dir
    if not os.path.isdir(folder):
        raise SystemExit(f"DIR: {folder!r} is not a directory")
    if args.remote_code and os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise SystemExit("--remote-code: DIR is a PEFT adapter; the modeling code goes with the base model "
                         "(push the base with --remote-code)")
    card_data = {k: v for k, v in {"base_model": args.base_model, "license": args.license}.items() if v is not None}
    common = dict(revision=args.revision, card_data=card_data, diagnostics=args.card_from, private=args.private,
                  commit_message=args.commit_message)
    try:
        if os.path.isfile(os.path.join(folder, "adapter_config.json")):
            card_data.pop("base_model", None)
            info = push_adapter(folder, args.repo, base_model=args.base_model, **common)
        else:
            info = push_to_hub(folder, args.repo, remote_code=args.remote_code, **common)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(json.dumps({"repo": args.repo, "revision": args.revision or "main", "commit": info.oid,
                      "url": info.commit_url}))
    return 0
