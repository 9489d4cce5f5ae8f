"""Stage `download`: bring the corpus selected by `data.source` into data/raw in the
VoiceBank-DEMAND layout (synthetic speech, the real VoiceBank-DEMAND set, or your folders)."""

from pathlib import Path

from segan.stage import run_stage

RAW = Path("data/raw")
ARCHIVES = Path("data/archives")  # downloaded zips; kept outside DVC outs so they survive re-runs


def main(params, args):
    data = params.data
    if data.source == "synthetic":
        from segan.data.synthetic import generate_synthetic
        generate_synthetic(data.synthetic, RAW, progress=not args.quiet)
    elif data.source == "valentini":
        from segan.data.valentini import fetch_valentini
        fetch_valentini(data.valentini, RAW, archive_cache=ARCHIVES, progress=not args.quiet)
    else:
        from segan.data.folder import import_folder
        import_folder(data.folder, RAW, progress=not args.quiet)


if __name__ == "__main__":
    run_stage("download", main)
