"""The ``leanvl`` command. Thin: parse arguments, call library functions, print results."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from leanvl import __version__

log = logging.getLogger("leanvl")


def _synth_overrides(items: list[str]) -> list[str]:
    """Accept ``pretrain_clips=10`` as well as ``synth.pretrain_clips=10``."""
    return [item if item.startswith("synth.") or "=" not in item else f"synth.{item}"
            for item in items]


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, device and threads."""
    import os
    import platform

    import torch

    rows = [("leanvl", __version__), ("python", platform.python_version()),
            ("platform", platform.platform())]
    for name in ("torch", "torchvision", "av", "transformers", "timm", "numpy", "omegaconf",
                 "webdataset", "decord"):
        try:
            module = __import__(name)
            rows.append((name, getattr(module, "__version__", "installed")))
        except ImportError:
            rows.append((name, "not installed"))
    if torch.cuda.is_available():
        devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        rows.append(("device", f"cuda ({torch.cuda.device_count()}: {devices})"))
        rows.append(("bf16", str(torch.cuda.is_bf16_supported())))
    else:
        rows.append(("device", "cpu (no CUDA device visible)"))
    rows.append(("cpu cores", str(os.cpu_count())))
    rows.append(("torch threads", f"{torch.get_num_threads()} intra-op, "
                 f"{torch.get_num_interop_threads()} inter-op"))
    try:
        from leanvl.data.text import offline_bert_path

        rows.append(("offline tokenizer", str(offline_bert_path())))
    except ImportError as error:
        rows.append(("offline tokenizer", f"unavailable ({error})"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0


def _synth_config(args: argparse.Namespace):
    from leanvl.config import SynthConfig, load_config, save_config, to_object

    overrides = _synth_overrides(args.overrides)
    if getattr(args, "out", None):
        overrides.append(f"synth.out={args.out}")
    cfg = load_config(getattr(args, "config", None), overrides)
    synth: SynthConfig = to_object(cfg).synth
    save_config(cfg.synth, synth.out, "synth_config.yaml")
    return synth


def cmd_data_synth(args: argparse.Namespace) -> int:
    """Generate the synthetic benchmark."""
    synth = _synth_config(args)
    from leanvl.data import synthetic

    summary = synthetic.generate(synth, progress=not args.quiet)
    print(synthetic.format_summary(summary))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """Validate records and decode every video; non-zero exit when anything is wrong."""
    from leanvl.data.check import check_annotations, write_clean

    report = check_annotations(args.annotations, args.root, workers=args.workers,
                               min_frames=args.min_frames, progress=not args.quiet)
    print(report.table())
    if args.clean_out:
        path = write_clean(report, args.clean_out)
        print(f"wrote {len(report.good_records)} good records to {path}")
    return 0 if report.ok else 1


def cmd_data_shard(args: argparse.Namespace) -> int:
    """Pack annotations and media into WebDataset shards."""
    from leanvl.data.shards import write_shards

    index = write_shards(args.annotations, args.root, args.out, max_count=args.max_count,
                         max_size=int(args.max_size_mb * 2**20), progress=not args.quiet)
    print(f"wrote {index['samples']} samples in {len(index['shards'])} shards to {args.out}")
    if index["missing"]:
        print(f"skipped {len(index['missing'])} missing/empty media, e.g. {index['missing'][0]}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    """Convert a public benchmark's annotation files."""
    from leanvl.data import convert

    spec = convert.get_converter(args.converter)
    kwargs = {name: getattr(args, name) for name in spec.argument_names}
    summary = convert.convert(spec.name, args.out, **kwargs)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def _run_config(preset: str | None, overrides: list[str], extra: list[str] = ()):
    from leanvl.config import load_config

    return load_config(preset, list(overrides) + list(extra))


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pre-train a model from a preset/YAML plus key=value overrides."""
    from leanvl.tasks.pretrain import run_pretrain

    cfg = _run_config(args.config, args.overrides)
    result = run_pretrain(cfg, progress=not args.quiet)
    print(json.dumps({k: v for k, v in result.items() if k in ("step", "epoch", "eval", "released")},
                     indent=1, default=str))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune for retrieval, QA, multiple choice (= retrieval) or classification."""
    from leanvl.tasks.finetune import run_finetune

    cfg = _run_config(args.config, args.overrides, [f"train.task={args.task}"])
    result = run_finetune(cfg, args.task, progress=not args.quiet)
    print(json.dumps({k: v for k, v in result.items() if k in ("step", "eval", "released")},
                     indent=1, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate released weights on data.test for one task."""
    from leanvl.config import load_config
    from leanvl.engine.checkpoint import released_eval_settings, trained_input_settings
    from leanvl.engine.distributed import is_main
    from leanvl.tasks.finetune import run_eval

    extra = [f"model.pretrained={args.model}"] if args.model else []
    cfg = _run_config(args.config, args.overrides, extra)
    trained = trained_input_settings(cfg.model.pretrained) if cfg.model.pretrained else {}
    # the weights' own evaluation settings (converted UMT: the authors' protocol), likewise
    eval_settings = released_eval_settings(cfg.model.pretrained) if cfg.model.pretrained else {}
    if trained or eval_settings:
        base = {"data": trained, "eval": eval_settings}
        cfg = load_config(args.config, list(args.overrides) + extra, base=base)
        if trained and not args.quiet and is_main():
            print(_input_settings_line(trained, cfg.data), file=sys.stderr)
        if eval_settings and not args.quiet and is_main():
            print("leanvl: evaluation settings of the weights (the command line overrides): "
                  + ", ".join(f"eval.{k}={cfg.eval[k]}" for k in eval_settings), file=sys.stderr)
    metrics = run_eval(cfg, args.task, progress=not args.quiet)

    if is_main():  # under torchrun every rank has the same metrics
        print(json.dumps(metrics, indent=1, default=float))
    return 0


def _input_settings_line(trained: dict, data) -> str:
    """What ``leanvl eval`` reads with, against what the model was trained with."""
    from leanvl.engine.checkpoint import to_plain

    now = {key: to_plain(data[key]) for key in trained}
    taken = [f"{key}={value}" for key, value in trained.items() if now[key] == value]
    changed = [f"{key}={now[key]} (trained: {value})" for key, value in trained.items()
               if now[key] != value]
    parts = [f"as trained: {', '.join(taken)}"] if taken else []
    if changed:
        parts.append(f"set by the config or command line: {', '.join(changed)}")
    return "leanvl: input settings " + "; ".join(parts)


def cmd_profile(args: argparse.Namespace) -> int:
    """Parameters, GFLOPs, latency, memory and training throughput of a registered model."""
    from leanvl.profile import format_table, profile_model

    rows = profile_model(args.model, frames=args.frames, size=args.size, batch=args.batch,
                         text_len=args.text_len, part=args.part, mask_ratio=args.mask_ratio,
                         latency=not args.no_latency, repeats=args.repeats,
                         train_batch=args.train_batch, overrides=args.overrides,
                         precision=args.precision)
    print(format_table(rows, style="markdown" if args.markdown else "text"))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    """A video tokenizer's codes: one clip's codes and picture, or codebook usage over data."""
    from leanvl.config import load_config
    from leanvl.engine.checkpoint import load_pretrained, trained_input_settings
    from leanvl.tasks.codes import dataset_codebook_statistics, write_clip_codes

    if bool(args.video) == bool(args.data):
        raise ValueError("give either a VIDEO (its codes and picture) or --data ANNOTATIONS "
                         "(codebook utilisation and perplexity over its clips)")
    overrides = [f"data.{key}={value}" for key, value in
                 (("num_frames", args.frames), ("size", args.size)) if value]
    cfg = load_config(None, overrides, base={"data": trained_input_settings(args.model)})
    model = load_pretrained(args.model)
    if args.video:
        summary = write_clip_codes(model, args.video, args.out, cfg.data.num_frames,
                                   cfg.data.size, cfg.data.backend)
    else:
        summary = dataset_codebook_statistics(model, args.data, args.root, cfg.data,
                                              batch_size=args.batch_size,
                                              progress_bar=not args.quiet)
    print(json.dumps(summary, indent=1, default=float))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert an official checkpoint to leanvl weights (safetensors)."""
    from leanvl.models.convert import convert_checkpoint

    summary = convert_checkpoint(args.kind, args.source, args.out, allow_pickle=args.allow_pickle,
                                 classes=args.classes, frames=args.frames,
                                 position_frames=args.position_frames)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """A method's demo on the synthetic benchmark (see leanvl.demo)."""
    from leanvl.demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.quiet, ablation=args.ablation,
             synth_overrides=args.overrides, teacher=args.teacher, method=args.method,
             budget_minutes=args.budget, precision=args.precision, started_at=args.budget_from)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Index a folder of videos (or an annotation file) for text-to-video search."""
    from leanvl.engine.checkpoint import trained_input_settings
    from leanvl.tasks.search import build_index, input_config

    trained = trained_input_settings(args.model) if os.path.exists(args.model) else {}
    data = input_config(args.model, args.overrides)
    if trained:
        print(_input_settings_line(trained, data), file=sys.stderr)
    elif os.path.exists(args.model):
        print(f"leanvl: {args.model} records no input settings (converted weights?): reading "
              f"{data.num_frames} frames at {data.size} px, normalization {data.normalization}, "
              f"text up to {data.max_text_len} tokens; give data.* for the model's own",
              file=sys.stderr)
    try:
        report = build_index(args.path, args.model, args.out, root=args.root,
                             window=args.window, stride=args.stride, overrides=args.overrides,
                             batch_size=args.batch_size, num_workers=args.workers,
                             dtype=args.dtype, rebuild=args.rebuild, progress=not args.quiet,
                             threads=args.threads)
    except KeyboardInterrupt as stop:  # the finished files are saved: say so, no traceback
        print(str(stop) or "interrupted", file=sys.stderr)
        return 130
    print(report.summary())
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Search an index with one or more text queries."""
    from leanvl.tasks.search import Searcher, contact_sheet, format_hits

    searcher = Searcher(args.index)
    results = searcher.search(args.queries, k=args.k, rerank=args.rerank, backend=args.backend)
    if args.json:
        print(json.dumps({"index": args.index, "results": [
            {"query": query, "hits": [hit.as_dict() for hit in hits]}
            for query, hits in zip(args.queries, results)]}, indent=1))
    else:
        print("\n\n".join(format_hits(q, hits) for q, hits in zip(args.queries, results)))
    if args.sheet:
        from pathlib import Path

        sheet = Path(args.sheet)
        for number, (query, hits) in enumerate(zip(args.queries, results)):
            if not hits:
                continue
            out = sheet if len(args.queries) == 1 else \
                sheet.with_name(f"{sheet.stem}-{number + 1}{sheet.suffix}")
            contact_sheet(hits, out, title=query)
            print(f"wrote {out}", file=sys.stderr)
    return 0


def _add_search_parsers(sub) -> None:
    p = sub.add_parser("index", help="index a folder of videos (or an annotation file) for "
                       "text-to-video search", description="Index videos for `leanvl search`: "
                       "windows of each video are encoded with the model's input settings as "
                       "trained; re-running indexes only new or changed files.")
    p.add_argument("path", help="folder of videos (searched recursively) or annotation file")
    p.add_argument("--model", required=True, help="released weights folder (or a .pt checkpoint)")
    p.add_argument("--out", required=True, help="index folder (created, or updated)")
    p.add_argument("--root", help="annotation file: folder its relative paths are joined to "
                   "(default: the file's folder)")
    p.add_argument("--window", type=float, help="window length in seconds (default: 10 for a "
                   "folder; an annotation file's records as they are)")
    p.add_argument("--stride", type=float, help="seconds between window starts "
                   "(default: the window length)")
    p.add_argument("--batch-size", type=int, default=16, help="clips encoded at a time")
    p.add_argument("--workers", type=int, help="decoding processes (default: cores - 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: the cores left beside the workers)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float32",
                   help="how embeddings are stored (default float32: search ranks exactly as "
                   "`leanvl eval retrieval`; float16 halves the index on disk)")
    p.add_argument("--rebuild", action="store_true",
                   help="re-encode everything (needed when the model or settings change)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="data settings replacing the trained ones (e.g. data.num_frames=8)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search an index with text queries",
                       description="Rank the indexed windows for each query: file, start, end, "
                       "score.")
    p.add_argument("index", help="index folder written by `leanvl index`")
    p.add_argument("queries", nargs="+", metavar="QUERY", help="text queries")
    p.add_argument("-k", type=int, default=10, help="hits per query (default 10)")
    p.add_argument("--rerank", type=int, default=0, metavar="K",
                   help="re-score the top K windows with the model's matching head (they are "
                   "decoded and encoded again)")
    p.add_argument("--backend", choices=["auto", "torch", "faiss"], default="auto",
                   help="vector search: an exact torch matmul (auto), or faiss's exact "
                   "inner-product index (pip install faiss-cpu)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--sheet", help="write the hits' middle frames with their scores to this PNG")
    p.set_defaults(func=cmd_search)


def _add_convert_parsers(data_sub) -> None:
    from leanvl.data import convert

    parser = data_sub.add_parser("convert", help="convert a public benchmark's annotation files "
                                 "to leanvl's formats")
    conv_sub = parser.add_subparsers(dest="converter", required=True, metavar="FORMAT")
    for name, spec in convert.CONVERTERS.items():
        sub = conv_sub.add_parser(name, help=spec.help, description=spec.help)
        # Inputs are all optional to argparse: convert() checks which are needed, since
        # some converters accept alternative combinations (msrvtt: data_json or test_csv).
        for item in spec.inputs:
            sub.add_argument("--" + item.name.replace("_", "-"), dest=item.name, metavar="PATH",
                             help=item.help + (" (required)" if item.required else ""))
        for option in spec.options:
            sub.add_argument("--" + option.name.replace("_", "-"), dest=option.name,
                             type=option.type, choices=option.choices, default=None,
                             help=f"{option.help} (default: {option.default})")
        sub.add_argument("--out", required=True, help="output annotation file (.json or .jsonl)")
        sub.set_defaults(func=cmd_data_convert)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``leanvl`` command."""
    parser = argparse.ArgumentParser(
        prog="leanvl", description="Efficient video-language models: data, pre-training, "
        "fine-tuning, evaluation and profiling.")
    parser.add_argument("--version", action="version", version=f"leanvl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from leanvl.demo import BUDGET_MINUTES

    p = sub.add_parser("info", help="versions, device and threads")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="a method on the synthetic benchmark, on the CPU: "
                       "pre-training, zero-shot evaluation, report (UMT: teacher, stage 1, "
                       "stage 2)")
    p.add_argument("--method", choices=["umt", "perceiver_vl", "smaug", "evilm"], default="umt",
                   help="which method's pipeline to run (default: umt)")
    p.add_argument("--out", default="work/demo", help="demo folder (default: work/demo)")
    p.add_argument("--quick", action="store_true", help="a smaller benchmark and shorter runs")
    p.add_argument("--ablation", action="store_true",
                   help="stage 2 alone (no stage 1, no UTA), as many steps as the full "
                   "pipeline's stage 2 took in this folder")
    p.add_argument("--teacher", help="CLIP visual weights to distil from (skips the demo teacher)")
    p.add_argument("--budget", type=float, default=BUDGET_MINUTES, metavar="MINUTES",
                   help="wall-clock budget for the whole demo: each stage's steps are sized to "
                   f"fit it on this machine, never beyond the preset (default: "
                   f"{BUDGET_MINUTES:g}; 0: the "
                   "presets' lengths, no plan)")
    p.add_argument("--budget-from", type=float, metavar="UNIX_TIME",
                   help="count the budget from this time (seconds since the epoch) rather than "
                   "from now: `make demo` passes its own start, so the install counts")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="training precision on the CPU (default: $LEANVL_DEMO_PRECISION, else "
                   "auto: bf16 where the CPU has native bf16 units); fp32 runs as a CPU "
                   "without them would")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="synthetic benchmark options (SynthConfig fields); train.*, data.*, "
                   "eval.* and model.* ones go to every stage's run config")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain", help="pre-train a model (e.g. leanvl pretrain umt_b16_stage1 "
                       "data.train=... model.kwargs.teacher=...)")
    p.add_argument("config", help="preset name (see leanvl/presets) or YAML file")
    p.add_argument("--quiet", action="store_true", help="no progress bar (a log line per "
                   "train.log_every steps instead)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune: retrieval, qa, mc (trains retrieval), classify")
    p.add_argument("task", choices=["retrieval", "qa", "mc", "classify"])
    p.add_argument("config", help="preset name or YAML file")
    p.add_argument("--quiet", action="store_true", help="no progress bars (a log line per "
                   "train.log_every steps instead)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="evaluate weights on data.test: retrieval, qa, mc, classify, "
                       "or probe (a linear probe trained on data.train's frozen features)")
    p.add_argument("task", choices=["retrieval", "qa", "mc", "classify", "probe"])
    p.add_argument("--model", help="released weights folder or a .pt checkpoint "
                   "(sets model.pretrained)")
    p.add_argument("--config", help="preset name or YAML file for data/eval settings")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("profile", help="params per component, GFLOPs, latency, memory, "
                       "training throughput")
    p.add_argument("model", help="registered model name (leanvl.list_models())")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--part", choices=["auto", "video", "text", "full", "pair"], default="auto",
                   help="what the GFLOPs/latency cover: the video encoder (the papers' tables), "
                   "the text encoder, video + text + one matching pass, or one (clip, caption) "
                   "pair through the cross-encoder with GFLOPs by component (auto: the model's "
                   "default, pair for E-ViLM, else video)")
    p.add_argument("--mask-ratio", type=float, default=0.0,
                   help="drop this fraction of video tokens (random) before the encoder")
    p.add_argument("--no-latency", action="store_true", help="count only (no timing)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=0,
                   help="also measure pre-training throughput (clips/s) at this batch size")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="training-throughput precision (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="create_model keyword overrides (YAML values)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("tokenize", help="a video tokenizer's codes (E-ViLM): a clip's codes "
                       "and a picture of them, or codebook usage over an annotation file")
    p.add_argument("video", nargs="?", help="a video file: write its codes and their picture")
    p.add_argument("--model", required=True, help="released tokenizer weights folder")
    p.add_argument("--out", default="codes.png",
                   help="picture of the codes (PNG; the codes go to the same name .json)")
    p.add_argument("--data", help="annotation file: codebook utilisation and perplexity over "
                   "its clips instead")
    p.add_argument("--root", help="folder that relative media paths are joined to")
    p.add_argument("--frames", type=int, help="frames per clip (default: as trained)")
    p.add_argument("--size", type=int, help="frame size (default: as trained)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("convert", help="convert official checkpoints to leanvl weights")
    p.add_argument("kind", choices=["umt-stage1", "umt-finetune", "umt-stage2", "clip-visual",
                                    "perceiver-vl"])
    p.add_argument("source", help="official checkpoint (.pth/.pt/.bin/.ckpt/.safetensors)")
    p.add_argument("out", help="output .safetensors file (umt-finetune: a folder gives "
                   "released weights that `leanvl eval classify --model` loads; perceiver-vl: "
                   "always a folder, for `leanvl eval retrieval|mc --model`)")
    p.add_argument("--classes", help="umt-finetune: JSON list of class names (default: indices)")
    p.add_argument("--frames", type=int, help="umt-finetune: frames of a stored position table "
                   "(default: found from the table); umt-stage2: frames the released weights "
                   "read (default 4 for pre-training checkpoints, 12 for fine-tuned ones)")
    p.add_argument("--position-frames", type=int, default=0,
                   help="umt-stage2: frames the checkpoint was trained with; its position table "
                   "is resampled in time to the frames evaluated (the authors' ckpt_num_frame; "
                   "default: off, the 1-D table runs over all positions)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow full unpickling (only for files you trust)")
    p.set_defaults(func=cmd_convert)

    data = sub.add_parser("data", help="data tools: synth, check, convert, shard")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    p = data_sub.add_parser("synth", help="generate the synthetic video-text benchmark",
                            description="Generate the synthetic benchmark. Options are "
                            "SynthConfig fields as key=value (e.g. pretrain_clips=100 size=64).")
    p.add_argument("--out", help="output folder (default: synth.out, work/synth)")
    p.add_argument("--config", help="a preset name or YAML file with a synth: section")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="SynthConfig fields")
    p.set_defaults(func=cmd_data_synth)

    p = data_sub.add_parser("check", help="validate annotations and decode every video")
    p.add_argument("annotations", help="annotation file (JSON list or JSONL)")
    p.add_argument("--root", help="folder that relative media paths are joined to")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--min-frames", type=int, default=1,
                   help="report videos with fewer frames as too short (default 1)")
    p.add_argument("--clean-out", help="also write the records that passed to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_check)

    p = data_sub.add_parser("shard", help="pack annotations + media into WebDataset tar shards")
    p.add_argument("annotations", help="annotation file (JSON list or JSONL)")
    p.add_argument("--root", help="folder that relative media paths are joined to")
    p.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar + shards.json")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-size-mb", type=float, default=1024, help="shard size cap in MiB")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_shard)

    _add_convert_parsers(data_sub)
    _add_search_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``leanvl`` console script."""
    from leanvl.config import ConfigError
    from leanvl.data.annotations import AnnotationError
    from leanvl.data.video import VideoDecodeError

    parser = build_parser()
    # key=value overrides may follow options (`eval qa --model M data.test=...`), which a
    # positional nargs="*" cannot pick up after the options; collect them here.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if hasattr(args, "overrides") and all("=" in u and not u.startswith("-") for u in unknown):
            args.overrides = list(args.overrides) + unknown
        else:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = int(args.func(args) or 0)
    except (ConfigError, AnnotationError, VideoDecodeError, FileNotFoundError, ValueError,
            KeyError, TypeError, *_loaded_errors()) as error:
        print(f"leanvl: error: {_error_line(error)}", file=sys.stderr)
        _leave_process_group(failed=True)
        return 2
    except BaseException:
        _leave_process_group(failed=True)
        raise
    _leave_process_group(failed=False)
    return code


def _loaded_errors() -> tuple[type[Exception], ...]:
    """Clear errors of modules a command imported (importing them up front would cost every
    command torch's import time): too many corrupt clips."""
    datasets = sys.modules.get("leanvl.data.datasets")
    return (datasets.TooManyBadSamples,) if datasets is not None else ()


def _error_line(error: Exception) -> str:
    """The message of ``error``; for one a DataLoader worker raised (its message is the
    worker's traceback), the original exception's own message: from its unindented
    ``module.Name: ...`` line to the end (further lines and notes included)."""
    message = str(error)
    lines = message.rstrip().split("\n")
    words = lines[0].split()
    if len(words) < 3 or words[0] != "Caught" or "DataLoader worker" not in lines[0]:
        return message
    name = words[1]  # "Caught VideoDecodeError in DataLoader worker process 0."
    for at in range(len(lines) - 1, 0, -1):  # the unindented "module.Name: message" line
        head, sep, rest = lines[at].partition(": ")
        if sep and not lines[at][:1].isspace() and head.split(".")[-1] == name:
            return "\n".join([rest, *lines[at + 1:]])
    return message


def _leave_process_group(failed: bool) -> None:
    """A command that joined torchrun's group leaves it: after success every rank waits for the
    others first; after a failure this rank leaves at once (the others may be mid-collective)."""
    if "torch.distributed" not in sys.modules:
        return
    from leanvl.engine.distributed import abort, cleanup

    abort() if failed else cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
