"""python -m accdiffusion.lab.toy train|eval|maps|stats|pool|demo — see docs/toy-model.md and docs/toy-flow.md
(``--model flow-llm``: docs/toy-flow.md, "Single-stream with an LLM template")."""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line, without importing torch or running anything (tests/test_docs_commands.py
    parses the commands the docs show with it)."""
    # no abbreviations: a shortened flag in a doc breaks silently once another flag shares its prefix
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, allow_abbrev=False)
    p_train = add("train", help="train the toy model (weights → accdiffusion/lab/toy/)")
    p_train.add_argument("--minutes", type=float, default=40.0)
    p_train.add_argument("--batch", type=int, default=64)
    p_train.add_argument("--scenes", type=int, default=24000)
    p_train.add_argument("--out", type=Path, default=None)
    p_eval = add("eval", help="measure duplicates and word-mask IoU on fixed seeds")
    p_eval.add_argument("--scenes", type=int, default=50)
    p_eval.add_argument("--out", type=Path, default=None,
                        help="toy-eval.json (toy-eval-shifted.json with --shifted, toy-flow-eval-shifted.json with "
                             "--shifted --model flow, toy-eval-units.json with --units)")
    p_eval.add_argument("--shifted", action="store_true",
                        help="instead of the three configs: AccDiffusion defaults with window_mode overlap, shifted "
                             "on the model's size multiple (window_grain 0) and shifted with 1-px offsets and "
                             "cuts (window_grain 1), with window evaluations, seam ratios, standard errors "
                             "and paired differences from overlap (both toys)")
    p_eval.add_argument("--units", action="store_true",
                        help="instead: prompt_units words against phrases (each phrase mask and separator set), "
                             "captions as trained and as tag lists, with tile-prompt placement → toy-eval-units.json")
    p_eval.add_argument("--seed-offset", type=int, default=0,
                        help="scene and sampling seeds start here (held-out scenes: e.g. 500000; the docs' "
                             "tables use 0, training from 1000000)")
    p_eval.add_argument("--denoise", type=float, default=None,
                        help="hires denoising strength (default 0.6 for the UNet toy, 0.8 for the flow toy)")
    p_maps = add("maps", help="flow toy: word-map localisation by normalisation and blocks, "
                              "mean ± s.e. (docs/toy-flow.md, 'Which maps')")
    p_maps.add_argument("--scenes", type=int, default=200)
    p_maps.add_argument("--out", type=Path, default=Path("toy-flow-maps.json"))
    p_stats = add("stats", help="flow toy: per-channel statistics of hires stage outputs, raw and "
                                "re-standardised (docs/toy-flow.md)")
    p_stats.add_argument("--scenes", type=int, default=30)
    p_stats.add_argument("--out", type=Path, default=Path("toy-flow-stats.json"))
    p_pool = add("pool", help="pool eval --shifted reports of disjoint seeds (--seed-offset) into one "
                               "table, mean ± s.e. and paired differences over all their scenes")
    p_pool.add_argument("reports", type=Path, nargs="+")
    p_pool.add_argument("--out", type=Path, default=None)
    p_demo = add("demo", help="write the picture: first pass, plain tiling, AccDiffusion, tile map")
    p_demo.add_argument("--caption", default="a red disk and a blue square")
    p_demo.add_argument("--seed", type=int, default=3)
    p_demo.add_argument("--scale", type=int, default=3)
    p_demo.add_argument("--out", type=Path, default=Path("toy-demo.png"))
    for p in (p_train, p_eval, p_maps, p_stats, p_pool, p_demo):
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--model", choices=("unet", "flow", "flow-llm"), default="unet",
                       help="unet: the ldm UNet toy; flow: the joint-attention flow transformer; flow-llm: its "
                            "single-stream variant with a chat-template causal text encoder (docs/toy-flow.md)")
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.command == "pool":
        import json

        from .evaluate import pool_reports, shifted_table

        pooled = pool_reports([json.loads(path.read_text()) for path in args.reports])
        if args.out:
            args.out.write_text(json.dumps(pooled, indent=1))
        print(shifted_table(pooled))
        return
    if args.command == "train" and args.model == "flow-llm":
        from .train import train_flow_llm

        train_flow_llm(minutes=args.minutes, batch=args.batch, scenes=args.scenes, out=args.out)
    elif args.command == "train" and args.model == "flow":
        from .train import train_flow

        train_flow(minutes=args.minutes, batch=args.batch, scenes=args.scenes, out=args.out)
    elif args.command == "train":
        from .model import WEIGHTS
        from .train import train

        train(minutes=args.minutes, batch=args.batch, scenes=args.scenes, out=args.out or WEIGHTS)
    elif args.command == "eval" and args.model in ("flow", "flow-llm"):
        from .evaluate import kind_of, run_eval

        stem = "toy-flow-llm" if args.model == "flow-llm" else "toy-flow"
        if args.shifted:
            from .evaluate import SHIFTED_CONFIGS, shifted_table

            print(shifted_table(run_eval(scenes=args.scenes, out=args.out or Path(f"{stem}-eval-shifted.json"),
                                         kind=kind_of(args.model), configs=SHIFTED_CONFIGS, details=True,
                                         denoise=args.denoise, seed_offset=args.seed_offset)))
            return
        if args.model == "flow-llm":  # with standard errors and per-scene values (the docs' table)
            from .evaluate import FLOW_CONFIGS, duplicates_table

            print(duplicates_table(run_eval(scenes=args.scenes, out=args.out or Path(f"{stem}-eval.json"),
                                            kind=kind_of(args.model), configs=FLOW_CONFIGS, details=True,
                                            denoise=args.denoise, seed_offset=args.seed_offset)))
            return
        run_eval(scenes=args.scenes, out=args.out or Path("toy-flow-eval.json"), kind=kind_of("flow"),
                 study=True, denoise=args.denoise)
    elif args.command == "eval":
        from .evaluate import SHIFTED_CONFIGS, run_eval, run_units_eval

        if args.units:
            from .evaluate import units_table

            print(units_table(run_units_eval(scenes=args.scenes, out=args.out or Path("toy-eval-units.json"))))
        elif args.shifted:
            from .evaluate import shifted_table

            print(shifted_table(run_eval(scenes=args.scenes, out=args.out or Path("toy-eval-shifted.json"),
                                         configs=SHIFTED_CONFIGS, details=True, denoise=args.denoise,
                                         seed_offset=args.seed_offset)))
        else:
            run_eval(scenes=args.scenes, out=args.out or Path("toy-eval.json"))
    elif args.command == "maps":
        if args.model != "flow":
            parser.error("maps measures the flow toy's map choices: add --model flow")
        from .evaluate import flow_map_choices

        flow_map_choices(scenes=args.scenes, out=args.out)
    elif args.command == "stats":
        if args.model != "flow":
            parser.error("stats measures the flow toy: add --model flow")
        from .evaluate import flow_stage_statistics

        flow_stage_statistics(scenes=args.scenes, out=args.out)
    else:
        from .evaluate import demo, kind_of

        print(demo(args.caption, args.seed, args.scale, args.out, kind=kind_of(args.model)))


if __name__ == "__main__":
    main()
