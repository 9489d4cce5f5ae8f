"""Stage `prepare`: resample to 16 kHz mono, validate pairs, cut training windows into
memory-mappable arrays, keep test utterances whole (data/raw -> data/prepared)."""

from pathlib import Path

from segan.stage import run_stage


def main(params, args):
    from segan.data.prepare import prepare_corpus
    prepare_corpus(Path("data/raw"), Path("data/prepared"), params.prepare, progress=not args.quiet)


if __name__ == "__main__":
    run_stage("prepare", main)
