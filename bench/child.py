"""One benchmark job in a fresh process, so its peak RSS is its own: ``python -m bench.child KIND JSON``.

Prints one JSON line: ``peak_rss_mib`` = this process's peak plus the largest worker's peak (DataLoader
workers are forked children; their shared pages are counted twice, so this is an upper bound).
"""

from __future__ import annotations

import json
import resource
import sys


def _peak_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) / 1024.0  # ru_maxrss is KiB on Linux


def main(argv: list[str]) -> None:
    kind, args = argv[0], json.loads(argv[1])
    if kind == "extract":
        from mmcache.extract.extraction import ExtractConfig, run_extract

        run_extract(ExtractConfig(dataset="folder", data_dir=args["data_dir"], cache_dir=args["cache_dir"],
                                  name="bench", text_model=args["text_model"], image_model=args["image_model"],
                                  device=args["device"], precision=args["precision"],
                                  num_workers=args["num_workers"], progress=False, force=True))
    elif kind == "train":
        from mmcache.fuse.data import load_data
        from mmcache.fuse.heads import list_heads
        from mmcache.fuse.train import TrainConfig, train

        data = load_data("bench", modalities=("text", "image"), features=args["features"],
                         cache_dir=args["cache_dir"], device=args["device"])
        for head in list_heads():
            train(TrainConfig(head=head, dataset="bench", features=args["features"], epochs=args["epochs"],
                              patience=0, device=args["device"], cache_dir=args["cache_dir"],
                              runs_dir=args["cache_dir"] + "/runs", modalities=["text", "image"]), data)
    elif kind == "ablate":  # one ablation grid (bench/grid.py): wall seconds and layout too
        import time

        from mmcache.fuse.ablate import AblationConfig, run_ablation
        from mmcache.fuse.train import TrainConfig

        t0 = time.perf_counter()
        res = run_ablation(AblationConfig(
            datasets=["grid"], heads=args["heads"], features=[args["features"]], seeds=args["seeds"],
            base=TrainConfig(device=args["device"], **args["base"]), cache_dir=args["cache_dir"],
            runs_dir=args["runs_dir"], results_dir=args["runs_dir"] + "/results", jobs=0, stack=args["stack"],
            lrs=args.get("lrs"), plots=False))
        lay = res.layout or {}
        extra = {"seconds": time.perf_counter() - t0, "runs": len(res.runs), "failed": len(res.failed),
                 "layout": lay.get("choice") or f"{lay.get('processes')} process(es) x {lay.get('threads')} thread(s)",
                 "measured": {k: v for k, v in lay.items() if k != "choice"}}
        sys.stdout.write(json.dumps({"peak_rss_mib": _peak_mib(), **extra}) + "\n")
        return
    else:
        raise SystemExit(f"unknown job {kind!r}")
    sys.stdout.write(json.dumps({"peak_rss_mib": _peak_mib()}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
