"""The ``safeckpt push`` and ``safeckpt pull`` verbs (their entries are in `cli.VERBS`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import HubNotFoundError

PUSH_HELP = "upload a checkpoint to the Hugging Face Hub (as `hf upload`)"
PUSH_DESCRIPTION = """\
Upload a checkpoint to a Hugging Face Hub repo in one commit (the repo is created if needed).
The arguments are `hf upload`'s: the repo first, then the local source, then where in the repo.
Model weights (a bare state dict, e.g. model.safetensors, pytorch_model.bin, a sharded directory)
go up as model.safetensors, or model-0000k-of-0000n.safetensors + an index above --max-shard-size,
in the folder PATH_IN_REPO (default: the root), which transformers and
huggingface_hub.load_torch_model read. A training checkpoint (optimizer, counters, hparams, e.g. a
Fabric or Trainer .ckpt) goes up as a native .safeckpt file named PATH_IN_REPO (default
SRC's name with .safeckpt) that `safeckpt.load("hf://REPO/NAME.safeckpt", state)` restores whole.
Prints the hf:// URI of what was pushed, pinned to the new commit. Token and endpoint default to
HF_TOKEN and HF_ENDPOINT.

examples:
  safeckpt push me/run1 fabric.ckpt
  safeckpt push me/tiny-model model.safetensors --max-shard-size 2GB
  safeckpt push me/run1 last.ckpt epoch3.safeckpt --revision dev --commit-message "epoch 3"

exit codes: 0 pushed; 2 unreadable source, or the Hub refused (no such repo, no access).
--json prints {uri, repo_id, path_in_repo}; an error, {error, path, hint}."""

PULL_HELP = "download a repo, a file or a folder from the Hugging Face Hub (as `hf download`)"
PULL_DESCRIPTION = """\
Download a repo at a revision (branch, tag or commit), one file of it, or one folder (give an
hf:// URI) into the Hugging Face cache (or --cache-dir), or into --local-dir, and print the local
path. The options are `hf download`'s. A revision already in the cache is not downloaded again;
with HF_HUB_OFFLINE=1 the cached copy is used.

examples:
  safeckpt pull me/run1
  safeckpt pull me/run1 fabric.safeckpt --revision v1
  safeckpt pull hf://me/run1@v1/checkpoint --local-dir ./ckpt
  safeckpt pull me/tiny-model --include '*.safetensors' --include '*.json' --exclude '*-00002-*'

exit codes: 0 downloaded; 2 no such repo, revision or file, no access, or not cached offline.
--json prints {path, repo_id, revision}; an error, {error, path, hint}."""


def push_args(p: argparse.ArgumentParser) -> None:
    """The arguments of ``safeckpt push`` (``hf upload``'s order: repo, local source, path in repo).

    Example:
        >>> push_args(parser := argparse.ArgumentParser()); parser.parse_args(["me/run1", "a.ckpt"]).src
        'a.ckpt'
    """
    p.add_argument("repo_id", help="the repo to push to: owner/name")
    p.add_argument("src", help="checkpoint file or directory (any format safeckpt reads), or an hf:// URI")
    p.add_argument(
        "path_in_repo",
        nargs="?",
        help="folder for weights (default: the root), file name for a training checkpoint (default: SRC's name)",
    )
    p.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing)")
    p.add_argument("--commit-message", metavar="TEXT", help="commit message")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    p.add_argument("--max-shard-size", metavar="SIZE", help="shard above this size ('2GB', '500MB' or bytes)")
    _common(p)


def run_push(args: argparse.Namespace) -> int:
    """``safeckpt push``: `hub.push_to_hub`, then print the pushed checkpoint's hf:// URI.

    Example:
        $ safeckpt push me/run1 fabric.ckpt
        hf://me/run1@3f2c.../fabric.safeckpt
    """
    from . import hub  # imports torch: only when the verb runs

    _swapped(args.repo_id, args.src)
    _bars(args)
    uri = hub.push_to_hub(
        args.src,
        args.repo_id,
        path_in_repo=args.path_in_repo,
        revision=args.revision,
        commit_message=args.commit_message,
        private=args.private,
        create_pr=args.create_pr,
        max_shard_size=args.max_shard_size,
        token=args.token,
        endpoint=args.endpoint,
    )
    if args.json:
        print(json.dumps({"uri": uri, "repo_id": args.repo_id, "path_in_repo": hub.parse_uri(uri).path}))
    elif not args.quiet:
        print(uri)
    return 0


def _swapped(repo_id: str, src: str) -> None:
    """The order before `hf upload`'s (SRC REPO): say so, rather than report a missing file."""
    if os.path.exists(repo_id) and not os.path.exists(src) and not src.startswith("hf://"):
        raise ValueError(
            f"{src}: no such file or directory, while the repo {repo_id!r} names a local path; the repo comes "
            f"first, as in `hf upload`: safeckpt push {src} {repo_id}"
        )


def pull_args(p: argparse.ArgumentParser) -> None:
    """The arguments of ``safeckpt pull`` (``hf download``'s options).

    Example:
        >>> pull_args(parser := argparse.ArgumentParser()); parser.parse_args(["me/run1", "a.safeckpt"]).filename
        'a.safeckpt'
    """
    p.add_argument("repo", help="owner/name, or an hf://owner/name[@revision]/path URI")
    p.add_argument("filename", nargs="?", help="one file of the repo (default: the whole repo)")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main)")
    p.add_argument("--include", action="append", metavar="GLOB", help="only files matching (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="leave out files matching (repeatable)")
    p.add_argument("--local-dir", metavar="DIR", help="download into DIR instead of the cache")
    p.add_argument("--cache-dir", metavar="DIR", help="the Hub cache to use (default: HF_HUB_CACHE or HF_HOME/hub)")
    _common(p)


def run_pull(args: argparse.Namespace) -> int:
    """``safeckpt pull``: `hub.pull_from_hub` (an hf:// path may name a file or a folder), then
    print the local path.

    Example:
        $ safeckpt pull hf://me/run1@v1/checkpoint
        /home/me/.cache/huggingface/hub/models--me--run1/snapshots/3f2c.../checkpoint
    """
    from . import hub  # imports torch: only when the verb runs

    _bars(args)
    repo_id, revision, filename, folder = args.repo, args.revision, args.filename, None
    if repo_id.startswith("hf://"):
        loc = hub.parse_uri(repo_id)
        if filename is not None or (revision and loc.revision):
            raise ValueError(f"{repo_id}: give the path and revision in the URI or as arguments, not both")
        repo_id, revision, filename = loc.repo_id, revision or loc.revision, loc.path or None
    options = {
        "revision": revision,
        "local_dir": args.local_dir,
        "cache_dir": args.cache_dir,
        "token": args.token,
        "endpoint": args.endpoint,
    }
    try:
        path = hub.pull_from_hub(
            repo_id, filename=filename, allow_patterns=args.include, ignore_patterns=args.exclude, **options
        )
    except HubNotFoundError as e:
        if filename is None or e.key != filename:  # not "no such file": no folder of that name either
            raise
        folder = filename  # an hf:// path may name a folder: pull what is under it
        path = (
            hub.pull_from_hub(repo_id, allow_patterns=[f"{folder}/**"], ignore_patterns=args.exclude, **options)
            / folder
        )
        if not path.is_dir():
            raise
    if args.json:
        print(json.dumps({"path": os.fspath(path), "repo_id": repo_id, "revision": revision or "main"}))
    elif not args.quiet:
        print(Path(path))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="Hub token (default: HF_TOKEN, or the one saved by `hf auth login`)")
    p.add_argument("--endpoint", metavar="URL", help="Hub endpoint (default: HF_ENDPOINT, else huggingface.co)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a line")


def _bars(args: argparse.Namespace) -> None:
    """The Hub client's progress bars, like ours: on a terminal only, never with --quiet or --json."""
    if args.quiet or args.json or not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
