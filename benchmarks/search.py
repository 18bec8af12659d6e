"""``leanvl index`` / ``leanvl search`` on the synthetic benchmark's retrieval test split.

1. Index ``retrieval_test.jsonl`` with the model (float32 rows) and time it (clips/s).
2. For every test caption, compare ``leanvl search``'s top 10 with the top 10 of
   ``leanvl eval retrieval``'s dual-encoder score matrix (``evaluate_retrieval``,
   ``return_scores``) with the index's default float32 rows; the same with the rows cast to
   float16 (``--dtype float16``),
   where any difference is reported with the float32 score gap of the swapped pair.
3. Query latency: one caption at a time, end to end (tokenise, encode the text, search) and the
   vector search alone.
4. A 1,000,000-row index of random unit vectors of the model's embedding width, written and
   loaded as ``leanvl index`` writes it (float32 by default): load time and query latency.
5. Re-indexing a folder of clips after adding one clip: how many clips were encoded.

    python benchmarks/search.py --synth /tmp/synth --model runs/stage2/model [--workers 1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import table, update_section  # noqa: E402

from leanvl.config import EvalConfig  # noqa: E402
from leanvl.data.datasets import VideoTextDataset  # noqa: E402
from leanvl.engine.checkpoint import load_pretrained  # noqa: E402
from leanvl.tasks import search as search_module  # noqa: E402
from leanvl.tasks.build import build_text_encoder  # noqa: E402
from leanvl.tasks.retrieval import evaluate_retrieval  # noqa: E402
from leanvl.tasks.search import Searcher, VideoIndex, build_index, input_config  # noqa: E402


def compare_top(hits, expected_rows, paths, dual) -> tuple[int, float]:
    """(captions whose top 10 differs, largest float32 score gap between swapped candidates)."""
    differ, gap = 0, 0.0
    for q, (query, rows) in enumerate(zip(hits, expected_rows)):
        got = [h.path for h in query]
        want = [paths[int(i)] for i in rows]
        if got != want:
            differ += 1
            index = {p: i for i, p in enumerate(paths)}
            for g, w in zip(got, want):
                if g != w:
                    gap = max(gap, abs(float(dual[q, index[g]] - dual[q, index[w]])))
    return differ, gap


def cpu_name() -> str:
    """The CPU's model name (and avx512_bf16 when it has it)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown")
    return name + (" with avx512_bf16" if "avx512_bf16" in info else "")


def latency_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def million_rows(width: int, rows: int, folder: Path, repeats: int) -> dict[str, float]:
    """Write a random index the way ``build_index`` does; time loading and querying it."""
    generator = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(rows, width, generator=generator), dim=1)
    meta = {"format": search_module.INDEX_FORMAT, "model": {}, "input": {}, "window": None,
            "stride": None, "mode": "embedding", "dtype": "float32", "feature_class": None,
            "files": [{"path": "random", "first": 0, "count": rows}], "skipped": []}
    tensors = {"embedding": vectors, "start": torch.zeros(rows, dtype=torch.float64),
               "end": torch.ones(rows, dtype=torch.float64),
               "whole": torch.ones(rows, dtype=torch.uint8),
               "file": torch.zeros(rows, dtype=torch.int32)}
    del vectors
    search_module._write_index(folder, meta, tensors)
    size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    del tensors
    start = time.perf_counter()
    index = VideoIndex(folder)
    load = time.perf_counter() - start
    query = torch.nn.functional.normalize(torch.randn(1, width, generator=generator), dim=1)
    top = latency_ms(lambda: index.top_by_embedding(query, 10, backend="torch"), repeats)
    faiss = None
    if search_module._faiss() is not None:  # optional: the same search through faiss
        faiss = latency_ms(lambda: index.top_by_embedding(query, 10, backend="faiss"), repeats)
    return {"rows": rows, "width": width, "MiB": size, "load_s": load, "query_ms": top,
            "faiss_ms": faiss}


def parity(model_path: str, synth: Path, out: Path, workers: int):
    """Index the test split (float32 rows, timed), evaluate retrieval on it, and count the
    captions whose top 10 differs (float32 rows, then rows cast to float16)."""
    annotations = synth / "retrieval_test.jsonl"
    start = time.perf_counter()
    report = build_index(annotations, model_path, out, dtype="float32", num_workers=workers,
                         batch_size=32, progress=False)
    seconds = time.perf_counter() - start
    model = load_pretrained(model_path)
    data = input_config(model_path)
    dataset = VideoTextDataset(annotations, synth, num_frames=data.num_frames,
                               sampling=data.test_sampling, size=data.size, train=False,
                               normalization=data.normalization, mean=data.mean, std=data.std)
    texts, _ = dataset.texts()
    # the dual ranking only: re-ranking (eval.rerank_k, 128 by default) is not compared here
    # and would cost 2 x 128 cross-encoder passes per caption
    result = evaluate_retrieval(model, dataset, build_text_encoder(data, model),
                                EvalConfig(rerank_k=0), num_workers=workers,
                                progress_bar=False, return_scores=True)
    dual = result["scores"]["dual"]
    expected = dual.topk(10, dim=1).indices
    paths = [str((synth / r["video"]).resolve()) for r in dataset.records]
    searcher = Searcher(out, model=model)
    differ32, gap32 = compare_top(searcher.search(texts, k=10), expected, paths, dual)
    index = searcher.index
    if index.mode == "embedding":  # float16 storage, as --dtype float16 writes it
        index.embedding = index.embedding.half().float()
    else:
        for key, value in index.tensors.items():
            if key.startswith("feature.") and value.is_floating_point():
                index.tensors[key] = value.half().float()
    differ16, gap16 = compare_top(searcher.search(texts, k=10), expected, paths, dual)
    return (report, seconds, differ32, gap32, differ16, gap16, searcher, dataset, texts, model,
            data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synth", required=True, help="synthetic benchmark folder")
    parser.add_argument("--model", required=True, help="released weights")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes")
    parser.add_argument("--repeats", type=int, default=50, help="queries timed")
    parser.add_argument("--rows", type=int, default=1_000_000, help="random index rows")
    parser.add_argument("--features-model", help="also check the parity of a model whose "
                        "score is not a dot product (e.g. a mixed-stream Perceiver-VL)")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    args = parser.parse_args()
    synth = Path(args.synth)
    work = Path(tempfile.mkdtemp(prefix="leanvl-search-bench-"))
    try:
        # 1-2. indexing throughput and parity with retrieval evaluation's dual ranking
        (report, seconds, differ32, gap32, differ16, gap16, searcher, dataset, texts, model,
         data) = parity(args.model, synth, work / "index", args.workers)
        clips_per_s = report.windows / seconds
        other = None
        if args.features_model:
            other = parity(args.features_model, synth, work / "features_index", args.workers)

        # 3. query latency (float32 in memory, whatever the storage)
        one = texts[:args.repeats]
        position = iter(range(10**9))
        end_to_end = latency_ms(lambda: searcher.search([one[next(position) % len(one)]],
                                                        k=10), args.repeats)
        query = searcher.encode_queries(one[:1]).embedding
        vector = latency_ms(lambda: searcher.index.top_by_embedding(query, 10, "torch"),
                            args.repeats)

        # 4. a million random rows
        big = million_rows(int(query.shape[1]), args.rows, work / "big", args.repeats)
        shutil.rmtree(work / "big")

        # 5. re-indexing a folder after adding one clip
        folder = work / "folder"
        folder.mkdir()
        records = dataset.records[:21]
        for record in records[:20]:
            shutil.copy(synth / record["video"], folder)
        build_index(folder, args.model, work / "folder_index", num_workers=args.workers,
                    progress=False)
        shutil.copy(synth / records[20]["video"], folder)
        counted = []
        encode = type(model).encode_video
        type(model).encode_video = lambda self, video: counted.append(video.shape[0]) or \
            encode(self, video)
        again = build_index(folder, args.model, work / "folder_index",
                            num_workers=args.workers, progress=False)
        type(model).encode_video = encode
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        [f"index the {len(dataset):,} test clips (float32 rows; model loading included)",
         f"{report.windows} clips in {seconds:.1f} s = {clips_per_s:.1f} clips/s "
         f"({args.workers} decoding worker{'s' if args.workers != 1 else ''})"],
        ["captions whose top 10 equals eval retrieval's dual top 10 (float32 rows)",
         f"{len(texts) - differ32} / {len(texts)}"
         + (f" (largest float32 gap of a swapped pair {gap32:.2e})" if differ32 else "")],
        ["the same with float16 rows (`--dtype float16`)",
         f"{len(texts) - differ16} / {len(texts)}"
         + (f" (largest float32 gap of a swapped pair {gap16:.2e})" if differ16 else "")],
        *([[f"{other[9].registry_name} ({other[0].windows} clips, mode "
            f"{other[6].index.meta['mode']}): captions whose top 10 equals eval retrieval's "
            f"(float32 / float16 rows)",
            f"{len(texts) - other[2]} / {len(texts) - other[4]} of {len(texts)}; indexed at "
            f"{other[0].windows / other[1]:.1f} clips/s"]] if other else []),
        [f"query latency, end to end (tokenise, encode the text, search {len(dataset):,} rows)",
         f"{end_to_end:.1f} ms"],
        [f"query latency, vector search alone ({len(dataset):,} rows)", f"{vector:.2f} ms"],
        [f"random index: {big['rows']:,} rows x {big['width']} (float32 on disk)",
         f"{big['MiB']:.0f} MiB, loaded in {big['load_s']:.1f} s"],
        ["random index: query latency (exact torch search, top 10)",
         f"{big['query_ms']:.1f} ms"],
        *([[f"random index: query latency (faiss {search_module._faiss().__version__} "
            "IndexFlatIP, exact, top 10)", f"{big['faiss_ms']:.1f} ms"]]
          if big["faiss_ms"] is not None else []),
        ["re-index a 20-clip folder after adding one clip",
         f"{again.encoded_windows} clip encoded ({sum(counted)} through encode_video), "
         f"{again.kept_files} kept"],
    ]
    body = (f"Model: `{args.model}` ({model.registry_name}, read with its trained settings: "
            f"{data.num_frames} frames at {data.size} px); synthetic benchmark's "
            f"`retrieval_test.jsonl` ({len(dataset)} clips, {len(texts)} captions). CPU: "
            f"{cpu_name()}; torch threads: the cores left beside the decoding workers. A "
            "shared machine: other jobs may have run at the same time, so timings are upper "
            "bounds.\n\n"
            + table(["what", "measured"], rows))
    command = "python benchmarks/search.py " + " ".join(sys.argv[1:])
    if args.no_doc:
        print(body)
    else:
        update_section("search", "Search your own videos: index and query", command, body)


if __name__ == "__main__":
    main()
