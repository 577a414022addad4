"""``lit-safety organism {list,build,eval}``: build, inspect and check the model organisms."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from lit_safety.data.files import read_prompts
from lit_safety.io import write_json
from lit_safety.models.loading import load_model_and_tokenizer
from lit_safety.organism import organism_listing, organism_path
from lit_safety.organism.build import build_family
from lit_safety.organism.evaluate import evaluate_behaviour, refusal_rate
from lit_safety.organism.realdata import load_benign_examples, load_harmful_examples
from lit_safety.organism.specs import ORGANISM_NAMES, parse_organism_name


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-safety organism",
        description="Tiny chat models trained by lit-safety itself (offline, CPU, minutes), in unaligned "
        "(complies with harmful requests) and aligned (refuses them) variants. Cached under "
        "$LIT_SAFETY_CACHE (default ~/.cache/lit_safety); any config's model may name them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list builtin organisms, presets and whether they are built")

    build = sub.add_parser("build", help="build (train) organisms now instead of on first use")
    build.add_argument("names", nargs="*", default=list(ORGANISM_NAMES),
                       help="organism names, optionally with :preset (default: all four)")
    build.add_argument("--seed", type=int, default=None, help="corpus/training seed (default: the preset's, 0)")
    build.add_argument("--output-dir", type=Path, default=None,
                       help="build a real-data family here instead of into the cache (needs --harmful-data)")
    build.add_argument("--harmful-data", nargs="*", default=[],
                       help="files of harmful instructions (+ optional refusals 'output' / targets 'target'), "
                       "e.g. ../shared/data/refusals/circuit_breakers_train.json")
    build.add_argument("--benign-data", nargs="*", default=[],
                       help="files of benign instructions (+ optional 'output' answers), "
                       "e.g. ../shared/data/instructions/harmless_instructions_train.json")
    build.add_argument("--limit", type=int, default=None, help="use at most this many rows of each data file")
    build.add_argument("--steps-scale", type=float, default=1.0, help="multiply training steps (real data is larger)")

    ev = sub.add_parser("eval", help="refusal rate on held-out harmful prompts and answer rate on held-out benign ones")
    ev.add_argument("names", nargs="+", help="organism names or model directories")
    ev.add_argument("-n", type=int, default=200, help="held-out prompts of each kind")
    ev.add_argument("--harmful-file", action="append", default=[],
                    help="also report refusal on this harmful file (CSV/JSON/JSONL), e.g. AdvBench")
    ev.add_argument("--benign-file", action="append", default=[],
                    help="also report false refusal on this benign file, e.g. harmless_instructions_val.json")
    ev.add_argument("--file-limit", type=int, default=200, help="rows used from each extra file")
    ev.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ev.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bars on stderr (one per set: 'eval harmful (heldout)' ...)")
    return parser


def organism_main(argv: Sequence[str]) -> None:
    args = _parser().parse_args(list(argv))
    if args.command == "list":
        _list()
    elif args.command == "build":
        _build(args)
    else:
        _eval(args)


def _list() -> None:
    print_listing(organism_listing())


def print_listing(rows: Sequence[tuple[str, str, Path | None]]) -> None:
    """One line per builtin model: name, cache state, directory."""
    for name, state, path in rows:
        print(f"{name:32s} {state:14s} {path if path is not None else ''}".rstrip())


def _build(args: argparse.Namespace) -> None:
    if args.output_dir is None:
        if args.harmful_data or args.benign_data:
            raise SystemExit("--harmful-data/--benign-data build a real-data family: give --output-dir too")
        for name in args.names:
            parse_organism_name(name)  # all names valid before any training
        for name in args.names:
            start = time.perf_counter()
            path = organism_path(name, seed=args.seed)
            print(f"{name}: {path} ({time.perf_counter() - start:.0f} s)")
        return

    if not args.harmful_data:
        raise SystemExit("--output-dir builds a real-data family: give at least one --harmful-data file")
    if len(args.names) != 1 and set(args.names) != set(ORGANISM_NAMES):
        raise SystemExit("with --output-dir give one organism name (its architecture and preset are used)")
    if not args.output_dir.parent.is_dir():
        raise SystemExit(f"--output-dir {args.output_dir}: parent directory does not exist")
    _, spec = parse_organism_name(args.names[0])
    extra = [ex for f in args.harmful_data for ex in load_harmful_examples(f, limit=args.limit)]
    extra += [ex for f in args.benign_data for ex in load_benign_examples(f, limit=args.limit)]
    spec = spec.replace(
        base_steps=int(spec.base_steps * args.steps_scale),
        align_steps=int(spec.align_steps * args.steps_scale),
        **({"seed": args.seed} if args.seed is not None else {}),
    )
    description = {"harmful_data": args.harmful_data, "benign_data": args.benign_data, "limit": args.limit,
                   "extra_examples": len(extra)}
    start = time.perf_counter()
    paths = build_family(spec, args.output_dir, extra_examples=extra, extra_description=json.dumps(description))
    for variant, path in paths.items():
        print(f"{variant}: {path}")
    print(f"built in {time.perf_counter() - start:.0f} s")


def _eval(args: argparse.Namespace) -> None:
    files = [("harmful", "refusal_rate", f) for f in args.harmful_file]
    files += [("benign", "false_refusal_rate", f) for f in args.benign_file]
    prompts = {f: read_prompts(f, limit=args.file_limit) for _, _, f in files}
    results = {}
    for name in args.names:
        model, tokenizer = load_model_and_tokenizer(name)
        result = evaluate_behaviour(model, tokenizer, n=args.n, progress=args.progress)
        for kind, key, f in files:
            result[f"{key}[{f}]"] = refusal_rate(model, tokenizer, prompts[f], kind=kind, progress=args.progress,
                                                 stage=Path(f).name)
        results[name] = result
        print(name)
        for key, value in result.items():
            if isinstance(value, float):
                print(f"  {key:60s} {value:6.1%}")
    if args.out:
        write_json(args.out, results)
