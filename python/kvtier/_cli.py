"""What the ``kvtier`` operator commands share (warm, fsck, prefetch, inspect, doctor): prompt
files, the flags that name a namespace, the progress bar, and how a summary is printed."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


class UsageError(Exception):
    """Bad input: exit status 2."""


def read_prompts(path: str | Path, tokenizer: Callable[[], Any] | None = None) -> list[list[int]]:
    """The prompts of a JSONL file, as token ids. ``tokenizer()`` gives a tokenizer for lines with
    ``"text"`` (called once, when the first such line comes); without one such a line is refused.
    Raises UsageError naming the file and line of anything that is not a prompt."""
    prompts: list[list[int]] = []
    tok = None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from e
    for n, line in enumerate(lines, 1):
        where = f"{path}:{n}"
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not JSON ({e.msg})") from e
        if isinstance(item, dict) and "text" in item and "tokens" not in item:
            if not isinstance(item["text"], str):
                raise UsageError(f"{where}: \"text\" must be a string")
            if tok is None:
                if tokenizer is None:
                    raise UsageError(f"{where}: a text prompt needs a tokenizer, and none was found with the model: "
                                     "give token ids instead")
                try:
                    tok = tokenizer()
                except UsageError as e:
                    raise UsageError(f"{where}: a text prompt needs a tokenizer: {e}") from e
            prompts.append(list(tok(item["text"])["input_ids"]))
            continue
        ids = item.get("tokens") if isinstance(item, dict) else item
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32
                                                for t in ids):
            raise UsageError(f"{where}: a prompt is a list of token ids (0 <= id < 2^32), "
                             "{\"tokens\": [...]} or {\"text\": \"...\"}")
        prompts.append(ids)
    return prompts


def cached_blocks(store: Any, ns: int, tokens: Sequence[int]) -> tuple[int, list[str]]:
    """How many full blocks of ``tokens`` are cached, and the fastest tier of each (a lookup)."""
    with store.lookup(ns, tokens) as m:
        return m.block_count, list(m.tiers)


def add_quiet_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quiet", action="store_true", help="no progress bar (also off when stderr is not a terminal)")


@contextlib.contextmanager
def progress_bar(quiet: bool, desc: str, total: int | None, unit: str = "it",
                 unit_scale: bool = False) -> Iterator[Any]:
    """A tqdm bar on stderr (items or bytes, rate, ETA), closed on the way out; None with
    ``--quiet`` or when stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    bar = tqdm(total=total, unit=unit, unit_scale=unit_scale, unit_divisor=1024 if unit_scale else 1000,
               desc=desc, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def print_json(obj: Any) -> None:
    """One JSON object on stdout, for scripts."""
    print(json.dumps(obj, sort_keys=True))


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def add_namespace_args(ap: argparse.ArgumentParser, model_required: bool = False) -> None:
    """The flags that name a namespace the way the engine integrations do."""
    ap.add_argument("--model", required=model_required, default=None,
                    help="a Hugging Face model directory: the model id, weights revision and KV layout come "
                         "from it as kvtier.hf derives them (and text prompts use its tokenizer)")
    ap.add_argument("--model-id", default=None, help="the namespace's model id (default the model's config name)")
    ap.add_argument("--revision", default=None,
                    help="the weights' revision (default with --model: a digest of its weight files; else none)")
    ap.add_argument("--tenant", default="", help="the kvtier tenant (default the shared one)")
    ap.add_argument("--adapter", default="", help="a LoRA adapter id")


def namespace_of(args: argparse.Namespace) -> tuple[dict[str, str], Any]:
    """The namespace (open_namespace's keyword arguments) the flags name, and the model's config
    (None without --model). Raises UsageError when neither --model nor --model-id is given."""
    config = None
    if args.model:
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(args.model)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the model config of {args.model}: {e}") from e
    elif not args.model_id:
        raise UsageError("name the namespace: --model DIR, or --model-id (and --revision)")
    model_id = args.model_id or getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")
    revision = args.revision
    if revision is None:
        revision = ""
        if args.model:
            from . import hf
            revision = hf.weights_revision(args.model)
    return {"model": model_id, "tenant": args.tenant, "adapter": args.adapter, "revision": revision}, config


def tokenizer_of(args: argparse.Namespace) -> Callable[[], Any] | None:
    """A tokenizer loader for text prompts, when --model names a model."""
    if not getattr(args, "model", None):
        return None

    def load() -> Any:
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as e:
            raise UsageError(f"none loads with the model {args.model} ({e}); give token ids instead") from e
    return load
